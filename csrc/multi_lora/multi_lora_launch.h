// The torch-free entry points into the multi-adapter kernels (defined in multi_lora_kernels.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "multi_lora/multi_lora_plan.h"

namespace lora_kernels {

// Launch the shrink / expand that the plan names on `stream`; return the launch error
// (cudaSuccess when the launch was accepted). `p.item_m` picks the shrink's tile.
cudaError_t launch_multi_shrink(const MultiShrinkParams& p, bool bf16, const MultiLaunchPlan& plan,
                                cudaStream_t stream);
cudaError_t launch_multi_expand(const MultiExpandParams& p, bool bf16, const MultiLaunchPlan& plan,
                                cudaStream_t stream);
// The fused base GEMM + adapters epilogue; `p.tiles_per_cta` and `p.group_m` must be the plan's.
cudaError_t launch_multi_linear(const MultiLinearParams& p, bool bf16, const LaunchPlan& plan, cudaStream_t stream);

}  // namespace lora_kernels
