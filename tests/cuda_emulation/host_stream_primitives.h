// Host emulation of csrc/common/ptx_stream.cuh (see host_primitives.h for the emulator itself): the same
// names and signatures, with bounds and alignment checks, per-byte store counts (through
// emu::global_store) and per-byte *read* counts for the allocations registered with
// emu::count_reads -- so a test can check that a kernel read each element of W exactly once.
#pragma once

#include "host_primitives.h"

namespace emu {

struct ReadCounted {
  const unsigned char* base;
  size_t bytes;
  std::vector<uint8_t>* counts;
};

inline std::vector<ReadCounted>& read_counted() {
  static std::vector<ReadCounted> v;
  return v;
}

// Count the reads of [base, base + bytes) made by the streaming loads below.
inline void count_reads(const void* base, size_t bytes, std::vector<uint8_t>* counts) {
  read_counted().push_back({static_cast<const unsigned char*>(base), bytes, counts});
}

inline void global_load(void* dst, const void* src, size_t bytes, size_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(src) % align) fatal(std::string(what) + ": misaligned address");
  global_check(src, bytes, what);
  auto* c = static_cast<const unsigned char*>(src);
  for (auto& r : read_counted())
    if (c >= r.base && c + bytes <= r.base + r.bytes)
      for (size_t i = 0; i < bytes; ++i) {
        auto& n = (*r.counts)[c - r.base + i];
        if (n < 255) ++n;
      }
  std::memcpy(dst, src, bytes);
}

inline void aligned_store(void* dst, const void* v, size_t bytes, size_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(dst) % align) fatal(std::string(what) + ": misaligned address");
  global_store(dst, v, bytes, what);
}

// A warp-wide exchange of one 32-bit value per lane (every lane must take part, as __shfl_sync).
inline uint32_t warp_exchange(uint32_t value, int src_lane) {
  Machine& m = machine();
  const int lane = m.current % 32;
  WarpExchange& ex = m.warps[m.current / 32];
  ex.a[lane][0] = value;
  warp_rendezvous();
  const uint32_t r = ex.a[src_lane][0];
  warp_rendezvous();
  return r;
}

}  // namespace emu

namespace lora_kernels {
namespace ptx {

struct Vec16 {
  uint32_t w[4];
};

inline Vec16 ld_global_cs_v4(const void* p) {
  Vec16 v;
  emu::global_load(&v, p, 16, 16, "ld_global_cs_v4");
  return v;
}
inline void st_global_cs_v4(void* p, const Vec16& v) { emu::aligned_store(p, &v, 16, 16, "st_global_cs_v4"); }

template <class T>
inline T emu_load(const void* p, const char* what) {
  T v;
  emu::global_load(&v, p, sizeof(T), sizeof(T), what);
  return v;
}
inline uint16_t ld_global_cs_u16(const uint16_t* p) { return emu_load<uint16_t>(p, "ld_global_cs_u16"); }
inline uint32_t ld_global_cs_u32(const uint32_t* p) { return emu_load<uint32_t>(p, "ld_global_cs_u32"); }
inline uint64_t ld_global_cs_u64(const uint64_t* p) { return emu_load<uint64_t>(p, "ld_global_cs_u64"); }
inline int8_t ld_global_cs_s8(const int8_t* p) { return emu_load<int8_t>(p, "ld_global_cs_s8"); }
inline void st_global_cs_u16(uint16_t* p, uint16_t v) { emu::aligned_store(p, &v, 2, 2, "st_global_cs_u16"); }
inline void st_global_cs_u32(uint32_t* p, uint32_t v) { emu::aligned_store(p, &v, 4, 4, "st_global_cs_u32"); }
inline void st_global_cs_u64(uint64_t* p, uint64_t v) { emu::aligned_store(p, &v, 8, 8, "st_global_cs_u64"); }
inline void st_global_cs_s8(int8_t* p, int8_t v) { emu::aligned_store(p, &v, 1, 1, "st_global_cs_s8"); }

inline void st_global_s64(int64_t* p, int64_t v) { emu::aligned_store(p, &v, 8, 8, "st_global_s64"); }
inline int32_t ld_global_cg_s32(const int32_t* p) {
  emu::global_check(p, 4, "ld_global_cg_s32");
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
// Fibers switch only at barriers and warp primitives, so a read-modify-write here is atomic.
inline int32_t atomic_add_global_s32(int32_t* p, int32_t v) {
  const int32_t old = ld_global_cg_s32(p);
  const int32_t sum = int32_t(uint32_t(old) + uint32_t(v));
  emu::aligned_store(p, &sum, 4, 4, "atomic_add_global_s32");
  return old;
}

inline void st_shared_u32(uint32_t* p, uint32_t v) { emu::smem_write(p, &v, 4, "st_shared_u32"); }

inline int32_t shfl_up_s32(int32_t v, int delta) {
  const int lane = emu::machine().current % 32;
  return int32_t(emu::warp_exchange(uint32_t(v), lane >= delta ? lane - delta : lane));
}
inline int32_t shfl_idx_s32(int32_t v, int src_lane) { return int32_t(emu::warp_exchange(uint32_t(v), src_lane & 31)); }

inline uint32_t f32_as_u32(float v) { return emu::f32_bits(v); }
// The emulator is built with -ffp-contract=off: these are single IEEE operations, as on the GPU.
inline float fadd_rn(float a, float b) { return a + b; }
inline float fsub_rn(float a, float b) { return a - b; }
inline float fmul_rn(float a, float b) { return a * b; }

}  // namespace ptx
}  // namespace lora_kernels
