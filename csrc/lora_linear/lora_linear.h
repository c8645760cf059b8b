// Torch-facing launcher of the fused LoRA linear forward (defined in lora_linear.cpp, registered
// as the op lora_kernels::cuda_lora_linear_fwd in bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace lora_kernels {

// y = x @ weight.T + bias + scale * t @ lora_b.T, t = x @ A.T (fp32; written to `t` when save_t),
// where A = lora_a, or lora_a[:r] + lora_a[r:] (fp32 sum) when a_split (an fp32 adapter split
// into 16-bit high and low halves). Writes `y` [M, N] and `t` [M, r] in place.
// tile_kind: 0 = heuristic, 1 = small-M tile, 2 = large tile; tiles_per_cta: 0 = heuristic.
void cuda_lora_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, const std::optional<at::Tensor>& bias, double scale,
                          bool a_split, bool save_t, const at::Tensor& y, const at::Tensor& t,
                          int64_t tile_kind, int64_t tiles_per_cta);

}  // namespace lora_kernels
