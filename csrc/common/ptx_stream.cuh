// Device primitives beyond ptx.cuh, first used by the in-place merge (merge.cuh): streaming
// (read-once / write-once) global accesses, 16-byte vectors, warp shuffles, a global atomic, bit
// casts and fp32 arithmetic with explicit rounding. The same contract as ptx.cuh: every access a
// kernel makes goes through a named function, and the host emulator provides the same names
// (tests/cuda_emulation/host_stream_primitives.h) with bounds checks and per-byte read/store
// counts. Keep the two in step.
//
// Kept in its own header (not appended to ptx.cuh) so that kernels developed in parallel do not
// edit one file; the lead may fold it into ptx.cuh.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "common/ptx.cuh"

namespace lora_kernels {
namespace ptx {

struct Vec16 {  // 16 bytes as four 32-bit words, lowest address first
  uint32_t w[4];
};

// ---- streaming global accesses (.cs: "evict first", the data is touched once) --------------------
// Coherent loads (not ld.global.nc): W is written by the same kernel, which the read-only path
// does not allow. Addresses of the vector forms must be 16-byte aligned.
LK_DEVICE Vec16 ld_global_cs_v4(const void* p) {
  const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
  return Vec16{{v.x, v.y, v.z, v.w}};
}
LK_DEVICE void st_global_cs_v4(void* p, const Vec16& v) {
  __stcs(reinterpret_cast<uint4*>(p), make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]));
}
LK_DEVICE uint16_t ld_global_cs_u16(const uint16_t* p) { return __ldcs(reinterpret_cast<const unsigned short*>(p)); }
LK_DEVICE uint32_t ld_global_cs_u32(const uint32_t* p) { return __ldcs(reinterpret_cast<const unsigned int*>(p)); }
LK_DEVICE uint64_t ld_global_cs_u64(const uint64_t* p) { return __ldcs(reinterpret_cast<const unsigned long long*>(p)); }
LK_DEVICE int8_t ld_global_cs_s8(const int8_t* p) { return __ldcs(reinterpret_cast<const signed char*>(p)); }
LK_DEVICE void st_global_cs_u16(uint16_t* p, uint16_t v) { __stcs(reinterpret_cast<unsigned short*>(p), v); }
LK_DEVICE void st_global_cs_u32(uint32_t* p, uint32_t v) { __stcs(reinterpret_cast<unsigned int*>(p), v); }
LK_DEVICE void st_global_cs_u64(uint64_t* p, uint64_t v) { __stcs(reinterpret_cast<unsigned long long*>(p), v); }
LK_DEVICE void st_global_cs_s8(int8_t* p, int8_t v) { __stcs(reinterpret_cast<signed char*>(p), v); }

// ---- other global accesses --------------------------------------------------------------------
LK_DEVICE void st_global_s64(int64_t* p, int64_t v) { *p = v; }
// A value written by an earlier kernel (a status word): coherent, uncached in L1.
LK_DEVICE int32_t ld_global_cg_s32(const int32_t* p) { return __ldcg(reinterpret_cast<const int*>(p)); }
// Returns the old value.
LK_DEVICE int32_t atomic_add_global_s32(int32_t* p, int32_t v) { return atomicAdd(reinterpret_cast<int*>(p), v); }

// ---- shared memory (32-bit) -------------------------------------------------------------------
LK_DEVICE void st_shared_u32(uint32_t* p, uint32_t v) { *p = v; }

// ---- warp shuffles (all 32 lanes take part) ---------------------------------------------------
// shfl_up: lane L receives lane L - delta's value (its own when L < delta).
LK_DEVICE int32_t shfl_up_s32(int32_t v, int delta) { return __shfl_up_sync(0xffffffffu, v, delta); }
LK_DEVICE int32_t shfl_idx_s32(int32_t v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }

// ---- bits and explicitly rounded fp32 arithmetic ------------------------------------------------
LK_DEVICE uint32_t f32_as_u32(float v) { return __float_as_uint(v); }
// Round-to-nearest intrinsics: the compiler never contracts them into an FMA, whatever -fmad says,
// so a product and a sum written with them round exactly where the source says.
LK_DEVICE float fadd_rn(float a, float b) { return __fadd_rn(a, b); }
LK_DEVICE float fsub_rn(float a, float b) { return __fsub_rn(a, b); }
LK_DEVICE float fmul_rn(float a, float b) { return __fmul_rn(a, b); }

}  // namespace ptx
}  // namespace lora_kernels
