// Torch-facing launcher of the in-place merge kernel (defined in merge.cpp, registered as the op
// lora_kernels::cuda_merge_ in bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace lora_kernels {

// One pass of the merge kernel over the logical weight W [N, K] (weight.T when fan_in_fan_out),
// delta = scale * lora_b @ lora_a (lora_a [r, K], lora_b [N, r], weight's dtype or float32):
//   mode 0 (apply):  W = round(W +- delta)                          (subtract: -)
//   mode 1 (count):  status[1] += #non-finite round(W +- delta); W untouched
//   mode 2 (merge exact): W = round(W + delta), codes (int8, weight's shape) and escape table
//                    (escape_index int64 [C], escape_value weight's dtype [C], from slot status[0])
//   mode 3 (unmerge exact): W0 restored from codes (escaped elements are left to the caller's scatter)
// gated (modes 0, 2): nothing happens when status[1] != 0. status: int32 [2].
void cuda_merge_(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                 bool fan_in_fan_out, int64_t mode, bool subtract, bool gated,
                 const std::optional<at::Tensor>& status, const std::optional<at::Tensor>& codes,
                 const std::optional<at::Tensor>& escape_index, const std::optional<at::Tensor>& escape_value);

}  // namespace lora_kernels
