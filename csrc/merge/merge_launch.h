// The torch-free entry point into the in-place merge kernels (defined in merge_kernels.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "merge/merge_plan.h"

namespace lora_kernels {

enum class MergeWeight : int { kFp16 = 0, kBf16 = 1, kFp32 = 2 };

// Launches the merge kernel for `p` (from make_merge_params) on `stream` of the current device:
// one wave of CTAs (merge_grid). fp32 weights need fp32 adapters. Returns the launch error
// (cudaSuccess when the launch was accepted).
cudaError_t launch_merge(const MergeParams& p, MergeWeight weight, bool adapter_fp32, cudaStream_t stream);

}  // namespace lora_kernels
