// Device primitives used by the kernels: inline PTX for tensor-core MMA, ldmatrix and cp.async,
// plus plain global/shared accesses routed through named functions.
//
// Every global and shared memory access of a kernel goes through one of these functions, and the
// host emulator (tests/cuda_emulation/host_primitives.h) provides the same names with bounds and
// race checks, so the CPU test lane runs the kernel source itself. Keep the two in step: a new
// primitive here needs its emulated twin there.
//
// Targets: sm_80 and newer (mma.sync m16n8k16 bf16/f16, m16n8k8 tf32, ldmatrix, cp.async).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define LK_DEVICE __device__ __forceinline__

namespace lora_kernels {
namespace ptx {

LK_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- CTA-wide barrier ------------------------------------------------------------------------
LK_DEVICE void cta_sync() { __syncthreads(); }

// ---- 16-bit <-> fp32 (bit patterns; the kernels keep 16-bit data as uint16_t) ------------------
LK_DEVICE float f16_to_f32(uint16_t v) { return __half2float(__ushort_as_half(v)); }
LK_DEVICE float bf16_to_f32(uint16_t v) { return __bfloat162float(__ushort_as_bfloat16(v)); }
LK_DEVICE uint16_t f32_to_f16(float v) { return __half_as_ushort(__float2half_rn(v)); }
LK_DEVICE uint16_t f32_to_bf16(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }

// fp32 -> tf32, round to nearest (ties away), as a 32-bit register for mma .tf32 operands.
LK_DEVICE uint32_t f32_to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
}
LK_DEVICE float tf32_to_f32(uint32_t v) { return __uint_as_float(v); }

// ---- global memory ---------------------------------------------------------------------------
LK_DEVICE uint16_t ld_global_u16(const uint16_t* p) { return __ldg(reinterpret_cast<const unsigned short*>(p)); }
LK_DEVICE float ld_global_f32(const float* p) { return __ldg(p); }
LK_DEVICE void st_global_u16(uint16_t* p, uint16_t v) { *p = v; }
LK_DEVICE void st_global_u32(uint32_t* p, uint32_t v) { *p = v; }
LK_DEVICE void st_global_f32(float* p, float v) { *p = v; }

// ---- shared memory (scalar) ------------------------------------------------------------------
LK_DEVICE void st_shared_u16(uint16_t* p, uint16_t v) { *p = v; }
LK_DEVICE float ld_shared_f32(const float* p) { return *p; }
LK_DEVICE void st_shared_f32(float* p, float v) { *p = v; }

// ---- cp.async: global -> shared, 16 bytes, the bytes at or past src_bytes are zero-filled ------
// src_bytes in [0, 16]; with 0 nothing is read from global memory. dst and src 16-byte aligned.
LK_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_addr(smem_dst)), "l"(gmem_src), "r"(src_bytes) : "memory");
}
LK_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `Pending` of this thread's committed groups are still in flight.
template <int Pending>
LK_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(Pending) : "memory"); }

// ---- ldmatrix (non-transposed): 8x8 16-bit matrices from shared memory -------------------------
// Lane 8q+i gives the address of row i of matrix q; register q of lane L receives matrix q's
// row L/4, columns 2*(L%4) and 2*(L%4)+1 (lower column in the low half).
LK_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(smem_row)));
}
LK_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const uint16_t* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(smem_row)));
}

// ---- tensor-core MMA, fp32 accumulate: d += a . b -------------------------------------------
// m16n8k16, A row-major 16x16 (4 regs), B "col" 16x8 i.e. stored [n][k] (2 regs), D 16x8 (4 fp32).
template <bool kBf16>
LK_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (kBf16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// m16n8k8 tf32: a0 (g, c), a1 (g+8, c), a2 (g, c+4), a3 (g+8, c+4); b0 (k=c, n=g), b1 (k=c+4, n=g)
// with g = lane/4, c = lane%4; D as for m16n8k16.
LK_DEVICE void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace ptx
}  // namespace lora_kernels

// ---- Added for the multi-adapter kernels (csrc/multi_lora/multi_lora.cuh) ------------------------------
namespace lora_kernels {
namespace ptx {

LK_DEVICE int32_t ld_global_s32(const int32_t* p) { return __ldg(p); }
// 16 bytes from a 16-byte aligned global address (read-only path), as four 32-bit words; the
// word at the lowest address is r[0], and within a word the lower address is the low half.
LK_DEVICE void ld_global_v4(uint32_t (&r)[4], const void* p) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  r[0] = v.x; r[1] = v.y; r[2] = v.z; r[3] = v.w;
}
LK_DEVICE float u32_as_f32(uint32_t v) { return __uint_as_float(v); }
// A plain (coherent) 16-bit load, for data the kernel also writes (y of an in-place update):
// ld_global_u16's read-only path is only for data no thread writes during the kernel.
LK_DEVICE uint16_t ld_global_u16_rw(const uint16_t* p) { return *p; }
LK_DEVICE uint32_t ld_global_u32_rw(const uint32_t* p) { return *p; }  // (two 16-bit elements of y)
LK_DEVICE int32_t ld_shared_s32(const int32_t* p) { return *p; }
LK_DEVICE void st_shared_s32(int32_t* p, int32_t v) { *p = v; }
// Butterfly exchange within a full warp: the value of lane (lane ^ lane_mask).
LK_DEVICE float shfl_xor_f32(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }

}  // namespace ptx
}  // namespace lora_kernels
