// Host/device helpers shared by every op family's plan and kernels (lora_linear/, multi_lora/,
// merge/, common/tile_common.cuh): plain C++17, no CUDA, no torch.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define LK_HOST_DEVICE __host__ __device__
#else
#define LK_HOST_DEVICE
#endif

namespace lora_kernels {

LK_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of a 16-bit operand can be loaded as 16-byte chunks: base 16-byte aligned and the row
// stride (in elements) a multiple of 8.
inline bool rows_16byte_aligned(const void* p, int64_t ld, int64_t rows) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && (rows <= 1 || ld % 8 == 0);
}

// Two adjacent 16-bit outputs (even column, same row) can be stored as one aligned 32-bit word.
inline bool output_pairs_aligned(const void* y, int64_t ldy, int64_t rows) {
  return (reinterpret_cast<uintptr_t>(y) % 4 == 0) && (rows <= 1 || ldy % 2 == 0);
}

}  // namespace lora_kernels
