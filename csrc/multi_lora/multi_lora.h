// Torch-facing launchers of the multi-adapter shrink / expand (defined in multi_lora.cpp,
// registered as lora_kernels::cuda_lora_shrink / cuda_lora_expand in bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace lora_kernels {

// t [S, M, R] fp32 (written in full): t[s] = the segmented shrink of x [M, K] with
// lora_a_stacks[s] [L, R, K] (1 <= S <= 4 slices, one launch), scales [L] fp32 and ranks [L] int32
// (or none), over the AdapterIndex work list `work` [I, 3] int32 of pieces of at most item_m (16
// or 64) tokens and `sorted_tokens` [M] int32. row_split 4 (item_m 16 only) runs each piece as 4
// CTAs of 4 rows (the split decode shrink), 1 as one CTA.
void cuda_lora_shrink(const at::Tensor& x, at::TensorList lora_a_stacks, const at::Tensor& scales,
                      const std::optional<at::Tensor>& ranks, const at::Tensor& work,
                      const at::Tensor& sorted_tokens, int64_t item_m, const at::Tensor& t, int64_t row_split);

// In place, one launch for 1 <= S <= 4 slices: y[:, col_s : col_s + N_s] += the segmented expand
// of t[s] [M, R] fp32 with lora_b_stacks[s] [L, N_s, R], col_s = offset + N_0 + ... + N_{s-1};
// rows of tokens with no adapter, and columns outside the slices, are never stored to.
void cuda_lora_expand(const at::Tensor& y, const at::Tensor& t, at::TensorList lora_b_stacks,
                      const std::optional<at::Tensor>& ranks, const at::Tensor& work,
                      const at::Tensor& sorted_tokens, int64_t item_m, int64_t offset);

// y [M, N] (written in full) = x @ weight.T + bias + each token's adapter, given t = the segmented
// shrink's output [M, R] fp32: the base GEMM over the sorted token order (sorted_tokens,
// sorted_adapter [M], slot_start [L + 2], AdapterIndex views) with the expand in its epilogue.
// tile_kind: 0 = heuristic, 1 = small-M tile, 2 = large tile; tiles_per_cta: 0 = heuristic.
void cuda_multi_lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_b_stack, const at::Tensor& t,
                            const std::optional<at::Tensor>& ranks, const at::Tensor& sorted_tokens,
                            const at::Tensor& sorted_adapter, const at::Tensor& slot_start, const at::Tensor& y,
                            int64_t tile_kind, int64_t tiles_per_cta);

}  // namespace lora_kernels
