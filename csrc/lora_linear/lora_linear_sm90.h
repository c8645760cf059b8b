// The torch-free entry point into the Hopper (sm_90a) fused LoRA linear: one CUTLASS 4 TMA +
// wgmma GEMM whose K loop runs over the base product's K and then over a short "tail" of extra
// K columns on the same fp32 accumulator (defined in lora_linear_sm90_*.cu, declared here for
// the torch-facing launcher lora_linear_sm90.cpp). Plain C++17: no CUDA, CUTLASS or torch types.
//
//   y = x @ w.T + tail_x @ tail_w.T + bias        (fp32 accumulate, one rounding to y's dtype)
//
// The LoRA term rides in the tail: tail_x = [t_hi | t_lo] with t = scale * x @ A.T split into two
// 16-bit halves (t_hi + t_lo carries twice the 16-bit type's significant bits: its error is below
// 2^-16 |t| in bf16), tail_w = [B | B]; for an fp32 B, tail_x = [t_hi | t_lo | t_hi] and tail_w =
// [B_hi | B_hi | B_lo]. lora_kernels/cuda/lora_linear.py builds both.
//
// The backward's dx is the same kernel with the B operands read MN-major (lora_linear_sm90_dx_*.cu):
//
//   dx = dy @ w + tail_x @ tail_w                 (dy [M, N], w [N, K], tail_w [L, K]; no bias)
//
// with tail_x = [u_hi | u_lo], u = scale * dy @ B, and tail_w = [A; A] (rows), or
// [u_hi | u_lo | u_hi] and [A_hi; A_hi; A_lo] for fp32 adapters.
#pragma once

#include <stdint.h>

namespace lora_kernels {

// The forward's meaning of each field; for dx (launch_lora_linear_sm90_dx_*): x = dy [M, N_red],
// w = W [N_red, K_out] with row stride ldw (K_out contiguous), tail_w [L, K_out] with row stride
// ld_tail_w, y = dx [M, K_out], and the fields' N = K_out, K = N_red, bias null.
struct Sm90TailGemmParams {
  const void* x;       // [M, K]  16-bit, row stride ldx, unit stride along K
  const void* w;       // [N, K]  16-bit, row stride ldw
  const void* tail_x;  // [M, L]  x's dtype, row stride ld_tail_x
  const void* tail_w;  // [N, L]  x's dtype, row stride ld_tail_w
  const float* bias;   // [N] fp32 contiguous, or null (no bias)
  void* y;             // [M, N]  x's dtype, row stride ldy, unit column stride
  int64_t M, N, K, L;
  int64_t ldx, ldw, ld_tail_x, ld_tail_w, ldy;
  int device;          // the CUDA device the tensors live on
  int sm_count;        // its multiprocessor count (the persistent scheduler launches at most one CTA per SM)
};

// The compiled tile shapes (M x N x K per CTA, cooperative kernel: 2 consumer warpgroups + 1
// producer warp). Which one a problem takes is lora_kernels/cuda/lora_linear.py's sm90_plan.
enum Sm90Tile : int { kSm90Tile128x256 = 0, kSm90Tile128x128 = 1, kSm90Tile128x64 = 2 };
constexpr int kSm90TileCount = 3;

// TMA needs 16-byte aligned base addresses and row strides that are multiples of 16 bytes.
inline bool tma_compatible(const void* p, int64_t ld_elements, int element_bytes) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && ((ld_elements * element_bytes) % 16 == 0);
}

// Launches the kernel for `tile` on `stream` (a cudaStream_t); returns a cudaError_t as int
// (0 on success): cudaErrorInvalidConfiguration when CUTLASS refuses the problem (can_implement
// or a workspace it would need), cudaErrorInvalidValue for a tile that is not compiled.
// Defined by lora_linear_sm90_bf16.cu / _fp16.cu, which the build includes only when it has the
// CUTLASS headers and a 9.0a target (setup.py, lora_kernels/cuda/loader.py); weak here, so an
// extension built without them links and says so (lora_linear_sm90.cpp checks for null).
__attribute__((weak)) int launch_lora_linear_sm90_bf16(const Sm90TailGemmParams& p, int tile, void* stream);
__attribute__((weak)) int launch_lora_linear_sm90_fp16(const Sm90TailGemmParams& p, int tile, void* stream);

// The backward's dx, tiles kSm90Tile128x256 and kSm90Tile128x128 (cudaErrorInvalidValue for
// 128x64, which is not compiled for dx); defined by lora_linear_sm90_dx_bf16.cu / _fp16.cu.
__attribute__((weak)) int launch_lora_linear_sm90_dx_bf16(const Sm90TailGemmParams& p, int tile, void* stream);
__attribute__((weak)) int launch_lora_linear_sm90_dx_fp16(const Sm90TailGemmParams& p, int tile, void* stream);

}  // namespace lora_kernels
