// Torch-facing launchers of the Hopper fused LoRA linear and its backward's dx (defined in
// lora_linear_sm90.cpp, registered as lora_kernels::cuda_lora_linear_sm90_fwd / _dx in bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace lora_kernels {

// y = x @ weight.T + tail_x @ tail_w.T + bias (fp32 accumulate; bias float32 or None), written in
// place; tile: 0 = 128x256x64 (2x1 cluster), 1 = 128x128x64, 2 = 128x64x64. Needs an sm_90 device and a build
// with the sm90 kernels (cuda_lora_linear_sm90_built()).
void cuda_lora_linear_sm90_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& tail_x,
                               const at::Tensor& tail_w, const std::optional<at::Tensor>& bias, const at::Tensor& y,
                               int64_t tile);

// Whether the sm90 kernels were compiled into this build.
bool cuda_lora_linear_sm90_built();

// dx = dy @ weight + tail_x @ tail_w (fp32 accumulate), written in place: dy [M, N], weight [N, K],
// tail_x [M, L], tail_w [L, K] (rows: the LoRA tail, e.g. [A; A]), dx [M, K], one 16-bit dtype,
// unit stride along the last dimension, TMA-aligned; tile 0 = 128x256x64 (2x1 cluster), 1 = 128x128x64.
void cuda_lora_linear_sm90_dx(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& tail_x,
                              const at::Tensor& tail_w, const at::Tensor& dx, int64_t tile);

// Whether the sm90 dx kernels were compiled into this build.
bool cuda_lora_linear_sm90_dx_built();

}  // namespace lora_kernels
