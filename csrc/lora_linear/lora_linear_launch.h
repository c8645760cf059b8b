// The torch-free entry point into the fused LoRA linear kernels (defined in lora_linear_kernels.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "lora_linear/lora_linear_plan.h"

namespace lora_kernels {

// Launches the kernel that `plan` names on `stream`; returns the launch error (cudaSuccess when
// the launch was accepted). `p.tiles_per_cta` and `p.group_m` must be the plan's.
cudaError_t launch_lora_linear_fwd(const LoraLinearParams& p, bool bf16, const LaunchPlan& plan,
                                   cudaStream_t stream);

}  // namespace lora_kernels
