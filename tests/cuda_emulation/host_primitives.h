// Host emulation of the device primitives in csrc/common/ptx.cuh, so that the CPU test lane runs the
// CUDA kernel source itself (compiled by the host C++ compiler) and checks its index math.
//
// Each CUDA thread of a CTA is a fiber (ucontext); warp-level primitives (ldmatrix, mma.sync)
// exchange their operands through a per-warp rendezvous, and __syncthreads is a CTA rendezvous.
// The fibers are scheduled in a seeded random order, and each cp.async lands either when issued
// or only at the wait that covers it (also chosen at random), so that a missing barrier or wait
// shows up as wrong data. Besides the results, the emulator checks:
//   * every global access lies inside a registered allocation (an out-of-bounds access aborts);
//   * every shared-memory access lies inside the CTA's dynamic shared memory;
//   * shared-memory races between barriers (read-after-write, write-after-read, write-after-write
//     by different threads in the same barrier interval), like compute-sanitizer racecheck;
//   * every lane of a warp reaches each mma/ldmatrix, and every thread each barrier (a deadlock
//     or divergence aborts);
//   * how many times each byte of each output allocation is stored (the caller checks "once").
// The MMA and ldmatrix fragment layouts here are written from the PTX ISA's tables independently
// of the kernel, so a layout mistake in the kernel gives wrong numbers here.
#pragma once

#define LORA_KERNELS_HOST_EMULATION 1
#define LK_DEVICE inline

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace emu {

[[noreturn]] inline void fatal(const std::string& msg) {
  std::fprintf(stderr, "EMULATOR ERROR: %s\n", msg.c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

struct Allocation {
  std::string name;
  unsigned char* base;
  size_t bytes;
  std::vector<uint8_t>* store_counts;  // per byte, or null when stores are not expected
  const std::vector<uint8_t>* unreadable = nullptr;  // per byte: nonzero = must never be accessed
};

struct Shadow {  // per shared-memory byte: last write and last read in barrier epochs
  int32_t w_epoch = -1, r_epoch = -1;
  int16_t writer = -1, reader = -1;
  bool many_readers = false;
};

enum FiberState { kRunnable, kWaitWarp, kWaitCta, kDone };

struct PendingCopy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes;
  int64_t group;
};

struct WarpExchange {
  uint32_t a[32][4];
  uint32_t b[32][2];
  float d[32][4];
  const unsigned char* addr[32];
  int arrived = 0;
};

struct Machine {
  std::vector<Allocation> allocs;
  // the CTA being run
  int nthreads = 0;
  std::vector<unsigned char> smem;
  std::vector<Shadow> shadow;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<FiberState> state;
  std::vector<std::vector<PendingCopy>> pending;
  std::vector<int64_t> committed;
  std::vector<WarpExchange> warps;
  int cta_arrived = 0;
  int32_t epoch = 0;
  ucontext_t sched;
  int current = -1;
  std::mt19937_64 rng{1};
  std::function<void(int)> body;
  std::vector<std::string> races;
};

inline Machine& machine() {
  static Machine m;
  return m;
}

inline void register_allocation(const std::string& name, void* base, size_t bytes,
                                std::vector<uint8_t>* store_counts) {
  machine().allocs.push_back({name, static_cast<unsigned char*>(base), bytes, store_counts});
}

inline Allocation& global_check(const void* p, size_t bytes, const char* what) {
  auto* c = static_cast<const unsigned char*>(p);
  for (auto& a : machine().allocs)
    if (c >= a.base && c + bytes <= a.base + a.bytes) {
      if (a.unreadable != nullptr)
        for (size_t i = 0; i < bytes; ++i)
          if ((*a.unreadable)[c - a.base + i]) {
            char buf[256];
            std::snprintf(buf, sizeof buf, "%s: access to byte %zu of %s, which is marked never to be read "
                          "(thread %d)", what, size_t(c - a.base + i), a.name.c_str(), machine().current);
            fatal(buf);
          }
      return a;
    }
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s: global access of %zu bytes at %p is outside every allocation "
                "(thread %d)", what, bytes, p, machine().current);
  fatal(buf);
}

inline void global_store(void* p, const void* v, size_t bytes, const char* what) {
  Allocation& a = global_check(p, bytes, what);
  if (a.store_counts == nullptr) fatal(std::string(what) + ": store into input allocation " + a.name);
  size_t off = static_cast<unsigned char*>(p) - a.base;
  for (size_t i = 0; i < bytes; ++i) {
    auto& cnt = (*a.store_counts)[off + i];
    if (cnt < 255) ++cnt;
  }
  std::memcpy(p, v, bytes);
}

// ---- shared memory: bounds and races ----------------------------------------------------------
inline size_t smem_offset(const void* p, size_t bytes, const char* what) {
  Machine& m = machine();
  auto* c = static_cast<const unsigned char*>(p);
  if (c < m.smem.data() || c + bytes > m.smem.data() + m.smem.size()) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s: shared access of %zu bytes at offset %td is outside the %zu "
                  "bytes of dynamic shared memory (thread %d)", what, bytes, c - m.smem.data(),
                  m.smem.size(), m.current);
    fatal(buf);
  }
  return c - m.smem.data();
}

inline void race(const char* kind, size_t off, int other, const char* what) {
  Machine& m = machine();
  if (m.races.size() < 20) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s race at shared byte %zu: thread %d vs thread %d in barrier "
                  "interval %d (%s)", kind, off, m.current, other, m.epoch, what);
    m.races.push_back(buf);
  }
}

inline void smem_read(const void* p, size_t bytes, const char* what, int as_thread = -1) {
  Machine& m = machine();
  const int me = as_thread >= 0 ? as_thread : m.current;
  size_t off = smem_offset(p, bytes, what);
  for (size_t i = off; i < off + bytes; ++i) {
    Shadow& s = m.shadow[i];
    if (s.w_epoch == m.epoch && s.writer != me) race("read-after-write", i, s.writer, what);
    if (s.r_epoch == m.epoch && s.reader != me) s.many_readers = true;
    else if (s.r_epoch != m.epoch) s.many_readers = false;
    s.r_epoch = m.epoch;
    s.reader = int16_t(me);
  }
}

inline void smem_write(void* p, const void* v, size_t bytes, const char* what, int as_thread = -1) {
  Machine& m = machine();
  const int me = as_thread >= 0 ? as_thread : m.current;
  size_t off = smem_offset(p, bytes, what);
  for (size_t i = off; i < off + bytes; ++i) {
    Shadow& s = m.shadow[i];
    if (s.w_epoch == m.epoch && s.writer != me) race("write-after-write", i, s.writer, what);
    if (s.r_epoch == m.epoch && (s.reader != me || s.many_readers)) race("write-after-read", i, s.reader, what);
    s.w_epoch = m.epoch;
    s.writer = int16_t(me);
  }
  std::memcpy(p, v, bytes);
}

// ---- fibers -----------------------------------------------------------------------------------
inline void yield_to_scheduler() {
  Machine& m = machine();
  swapcontext(&m.ctx[m.current], &m.sched);
}

inline void fiber_entry() {
  Machine& m = machine();
  const int tid = m.current;
  m.body(tid);
  if (!m.pending[tid].empty()) fatal("thread " + std::to_string(tid) + " ended with cp.async copies never waited for");
  m.state[tid] = kDone;
}  // returns to uc_link = the scheduler

inline void warp_rendezvous() {
  Machine& m = machine();
  const int w = m.current / 32;
  WarpExchange& ex = m.warps[w];
  if (++ex.arrived == 32) {
    ex.arrived = 0;
    for (int l = 0; l < 32; ++l)
      if (m.state[w * 32 + l] == kWaitWarp) m.state[w * 32 + l] = kRunnable;
  } else {
    m.state[m.current] = kWaitWarp;
    yield_to_scheduler();
  }
}

// Runs `body(tid)` for every thread of one CTA to completion.
inline void run_cta(int nthreads, size_t smem_bytes, const std::function<void(int)>& body) {
  Machine& m = machine();
  m.nthreads = nthreads;
  m.smem.assign(smem_bytes, 0xA5);  // garbage, as on the GPU
  m.shadow.assign(smem_bytes, Shadow{});
  m.ctx.resize(nthreads);
  m.stacks.resize(nthreads);
  m.state.assign(nthreads, kRunnable);
  m.pending.assign(nthreads, {});
  m.committed.assign(nthreads, 0);
  m.warps.assign((nthreads + 31) / 32, WarpExchange{});
  m.cta_arrived = 0;
  m.epoch = 0;
  m.body = body;
  if (nthreads % 32 != 0) fatal("CTA size must be a multiple of 32");
  for (int t = 0; t < nthreads; ++t) {
    m.stacks[t].resize(256 * 1024);
    getcontext(&m.ctx[t]);
    m.ctx[t].uc_stack.ss_sp = m.stacks[t].data();
    m.ctx[t].uc_stack.ss_size = m.stacks[t].size();
    m.ctx[t].uc_link = &m.sched;
    makecontext(&m.ctx[t], fiber_entry, 0);
  }
  std::vector<int> order(nthreads);
  for (;;) {
    order.clear();
    for (int t = 0; t < nthreads; ++t)
      if (m.state[t] == kRunnable) order.push_back(t);
    if (order.empty()) {
      bool all_done = std::all_of(m.state.begin(), m.state.end(), [](FiberState s) { return s == kDone; });
      if (all_done) break;
      int warp_wait = 0, cta_wait = 0, done = 0;
      for (auto s : m.state) warp_wait += s == kWaitWarp, cta_wait += s == kWaitCta, done += s == kDone;
      fatal("deadlock: " + std::to_string(warp_wait) + " threads wait in warp-level primitives, " +
            std::to_string(cta_wait) + " at a barrier, " + std::to_string(done) + " have exited");
    }
    std::shuffle(order.begin(), order.end(), m.rng);
    for (int t : order) {
      if (m.state[t] != kRunnable) continue;
      m.current = t;
      swapcontext(&m.sched, &m.ctx[t]);
    }
  }
  m.current = -1;
}

// ---- numeric formats --------------------------------------------------------------------------
inline uint32_t f32_bits(float v) { uint32_t b; std::memcpy(&b, &v, 4); return b; }
inline float bits_f32(uint32_t b) { float v; std::memcpy(&v, &b, 4); return v; }
inline float half_to_float(uint16_t h) { _Float16 v; std::memcpy(&v, &h, 2); return float(v); }
inline uint16_t float_to_half(float f) { _Float16 v = _Float16(f); uint16_t h; std::memcpy(&h, &v, 2); return h; }
inline float bf16_to_float(uint16_t h) { return bits_f32(uint32_t(h) << 16); }
inline uint16_t float_to_bf16(float f) {  // round to nearest even
  uint32_t b = f32_bits(f);
  if (std::isnan(f)) return uint16_t((b >> 16) | 0x40);
  b += 0x7FFF + ((b >> 16) & 1);
  return uint16_t(b >> 16);
}

}  // namespace emu

// ================================================================================================
// The primitives, with the names and signatures of csrc/common/ptx.cuh.
// ================================================================================================
namespace lora_kernels {
namespace ptx {

inline void cta_sync() {
  emu::Machine& m = emu::machine();
  if (++m.cta_arrived == m.nthreads) {
    m.cta_arrived = 0;
    ++m.epoch;
    for (int t = 0; t < m.nthreads; ++t)
      if (m.state[t] == emu::kWaitCta) m.state[t] = emu::kRunnable;
  } else {
    m.state[m.current] = emu::kWaitCta;
    emu::yield_to_scheduler();
  }
}

inline float f16_to_f32(uint16_t v) { return emu::half_to_float(v); }
inline float bf16_to_f32(uint16_t v) { return emu::bf16_to_float(v); }
inline uint16_t f32_to_f16(float v) { return emu::float_to_half(v); }
inline uint16_t f32_to_bf16(float v) { return emu::float_to_bf16(v); }

inline uint32_t f32_to_tf32(float v) {  // cvt.rna.tf32.f32: nearest, ties away from zero
  uint32_t b = emu::f32_bits(v);
  if (!std::isfinite(v)) return b;
  return (b + 0x1000u) & 0xFFFFE000u;
}
inline float tf32_to_f32(uint32_t v) { return emu::bits_f32(v); }

inline uint16_t ld_global_u16(const uint16_t* p) { emu::global_check(p, 2, "ld_global_u16"); return *p; }
inline float ld_global_f32(const float* p) { emu::global_check(p, 4, "ld_global_f32"); return *p; }
inline void st_global_u16(uint16_t* p, uint16_t v) {
  if (reinterpret_cast<uintptr_t>(p) % 2) emu::fatal("st_global_u16: misaligned address");
  emu::global_store(p, &v, 2, "st_global_u16");
}
inline void st_global_u32(uint32_t* p, uint32_t v) {
  if (reinterpret_cast<uintptr_t>(p) % 4) emu::fatal("st_global_u32: misaligned address");
  emu::global_store(p, &v, 4, "st_global_u32");
}
inline void st_global_f32(float* p, float v) {
  if (reinterpret_cast<uintptr_t>(p) % 4) emu::fatal("st_global_f32: misaligned address");
  emu::global_store(p, &v, 4, "st_global_f32");
}

inline void st_shared_u16(uint16_t* p, uint16_t v) { emu::smem_write(p, &v, 2, "st_shared_u16"); }
inline float ld_shared_f32(const float* p) {
  emu::smem_read(p, 4, "ld_shared_f32");
  float v;
  std::memcpy(&v, p, 4);
  return v;
}
inline void st_shared_f32(float* p, float v) { emu::smem_write(p, &v, 4, "st_shared_f32"); }

inline void complete_copy(const emu::PendingCopy& c, int thread) {
  unsigned char buf[16] = {0};
  if (c.bytes > 0) std::memcpy(buf, c.src, c.bytes);
  emu::smem_write(c.dst, buf, 16, "cp.async (landing)", thread);
}

inline void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  emu::Machine& m = emu::machine();
  if (src_bytes < 0 || src_bytes > 16) emu::fatal("cp_async_16: src_bytes outside [0, 16]");
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 || reinterpret_cast<uintptr_t>(gmem_src) % 16)
    emu::fatal("cp_async_16: addresses must be 16-byte aligned");
  emu::smem_offset(smem_dst, 16, "cp_async_16 destination");
  if (src_bytes > 0) emu::global_check(gmem_src, src_bytes, "cp_async_16 source");
  emu::PendingCopy c{static_cast<unsigned char*>(smem_dst), static_cast<const unsigned char*>(gmem_src),
                     src_bytes, m.committed[m.current]};
  if (m.rng() & 1) complete_copy(c, m.current);  // landed at once ...
  else m.pending[m.current].push_back(c);        // ... or only at the wait that covers it
}
inline void cp_async_commit() { ++emu::machine().committed[emu::machine().current]; }
template <int Pending>
inline void cp_async_wait() {
  emu::Machine& m = emu::machine();
  auto& q = m.pending[m.current];
  const int64_t must_finish_below = m.committed[m.current] - Pending;  // groups [0, this) complete
  std::vector<emu::PendingCopy> keep;
  for (auto& c : q) {
    if (c.group < must_finish_below) complete_copy(c, m.current);
    else keep.push_back(c);
  }
  q.swap(keep);
}

// ldmatrix: lanes [8q, 8q + 8) give the rows of matrix q; register q of lane L = matrix q's row
// L/4, 16-bit columns 2*(L%4) (low half) and 2*(L%4)+1 (high half).
template <int NMAT>
inline void ldmatrix_emulated(uint32_t* r, const uint16_t* smem_row) {
  emu::Machine& m = emu::machine();
  const int lane = m.current % 32, w = m.current / 32;
  emu::WarpExchange& ex = m.warps[w];
  ex.addr[lane] = reinterpret_cast<const unsigned char*>(smem_row);
  if (reinterpret_cast<uintptr_t>(smem_row) % 16) emu::fatal("ldmatrix: row address not 16-byte aligned");
  emu::warp_rendezvous();
  for (int q = 0; q < NMAT; ++q) {
    const int src_lane = 8 * q + lane / 4;
    const unsigned char* row = ex.addr[src_lane];
    emu::smem_read(row + 4 * (lane % 4), 4, "ldmatrix", w * 32 + src_lane);
    std::memcpy(&r[q], row + 4 * (lane % 4), 4);
  }
  emu::warp_rendezvous();
}
inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* smem_row) { ldmatrix_emulated<4>(r, smem_row); }
inline void ldmatrix_x2(uint32_t (&r)[2], const uint16_t* smem_row) { ldmatrix_emulated<2>(r, smem_row); }

// mma.m16n8k16 .row.col, fp32 accumulate. PTX fragment tables (g = lane/4, c = lane%4):
//   A: reg0 = (g, 2c..2c+1), reg1 = (g+8, 2c..), reg2 = (g, 2c+8..), reg3 = (g+8, 2c+8..)
//   B: reg0 = (k = 2c..2c+1, n = g), reg1 = (k = 2c+8.., n = g)
//   C/D: d0 = (g, 2c), d1 = (g, 2c+1), d2 = (g+8, 2c), d3 = (g+8, 2c+1)
template <bool kBf16>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::Machine& m = emu::machine();
  const int lane = m.current % 32;
  emu::WarpExchange& ex = m.warps[m.current / 32];
  std::memcpy(ex.a[lane], a, sizeof a);
  std::memcpy(ex.b[lane], b, sizeof b);
  std::memcpy(ex.d[lane], d, sizeof d);
  emu::warp_rendezvous();
  auto cvt = [](uint32_t bits16) { return kBf16 ? emu::bf16_to_float(uint16_t(bits16)) : emu::half_to_float(uint16_t(bits16)); };
  double A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, c = L % 4;
    for (int h = 0; h < 2; ++h) {
      A[g][2 * c + h] = cvt(ex.a[L][0] >> (16 * h) & 0xFFFF);
      A[g + 8][2 * c + h] = cvt(ex.a[L][1] >> (16 * h) & 0xFFFF);
      A[g][2 * c + 8 + h] = cvt(ex.a[L][2] >> (16 * h) & 0xFFFF);
      A[g + 8][2 * c + 8 + h] = cvt(ex.a[L][3] >> (16 * h) & 0xFFFF);
      B[2 * c + h][g] = cvt(ex.b[L][0] >> (16 * h) & 0xFFFF);
      B[2 * c + 8 + h][g] = cvt(ex.b[L][1] >> (16 * h) & 0xFFFF);
    }
  }
  float out[4];
  const int g = lane / 4, c = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * c + (e % 2);
    double s = 0;
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    out[e] = float(double(ex.d[lane][e]) + s);
  }
  emu::warp_rendezvous();
  std::memcpy(d, out, sizeof out);
}

// mma.m16n8k8 .tf32: A: a0 (g, c), a1 (g+8, c), a2 (g, c+4), a3 (g+8, c+4);
// B: b0 (k = c, n = g), b1 (k = c+4, n = g); D as above. The low 13 bits of operands are ignored.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu::Machine& m = emu::machine();
  const int lane = m.current % 32;
  emu::WarpExchange& ex = m.warps[m.current / 32];
  std::memcpy(ex.a[lane], a, sizeof a);
  std::memcpy(ex.b[lane], b, sizeof b);
  std::memcpy(ex.d[lane], d, sizeof d);
  emu::warp_rendezvous();
  auto cvt = [](uint32_t v) { return double(emu::bits_f32(v & 0xFFFFE000u)); };
  double A[16][8], B[8][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, c = L % 4;
    A[g][c] = cvt(ex.a[L][0]);
    A[g + 8][c] = cvt(ex.a[L][1]);
    A[g][c + 4] = cvt(ex.a[L][2]);
    A[g + 8][c + 4] = cvt(ex.a[L][3]);
    B[c][g] = cvt(ex.b[L][0]);
    B[c + 4][g] = cvt(ex.b[L][1]);
  }
  float out[4];
  const int g = lane / 4, c = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * c + (e % 2);
    double s = 0;
    for (int k = 0; k < 8; ++k) s += A[row][k] * B[k][col];
    out[e] = float(double(ex.d[lane][e]) + s);
  }
  emu::warp_rendezvous();
  std::memcpy(d, out, sizeof out);
}

}  // namespace ptx
}  // namespace lora_kernels

// ---- Twins of the primitives added for the multi-adapter kernels (end of csrc/common/ptx.cuh) --------
namespace lora_kernels {
namespace ptx {

inline int32_t ld_global_s32(const int32_t* p) {
  if (reinterpret_cast<uintptr_t>(p) % 4) emu::fatal("ld_global_s32: misaligned address");
  emu::global_check(p, 4, "ld_global_s32");
  return *p;
}
inline void ld_global_v4(uint32_t (&r)[4], const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16) emu::fatal("ld_global_v4: address not 16-byte aligned");
  emu::global_check(p, 16, "ld_global_v4");
  std::memcpy(r, p, 16);
}
inline float u32_as_f32(uint32_t v) { return emu::bits_f32(v); }
inline uint16_t ld_global_u16_rw(const uint16_t* p) { emu::global_check(p, 2, "ld_global_u16_rw"); return *p; }
inline uint32_t ld_global_u32_rw(const uint32_t* p) {
  if (reinterpret_cast<uintptr_t>(p) % 4) emu::fatal("ld_global_u32_rw: misaligned address");
  emu::global_check(p, 4, "ld_global_u32_rw");
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline int32_t ld_shared_s32(const int32_t* p) {
  emu::smem_read(p, 4, "ld_shared_s32");
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline void st_shared_s32(int32_t* p, int32_t v) { emu::smem_write(p, &v, 4, "st_shared_s32"); }
// __shfl_xor_sync over the full warp: every lane must call it (the rendezvous checks that).
inline float shfl_xor_f32(float v, int lane_mask) {
  emu::Machine& m = emu::machine();
  const int lane = m.current % 32;
  emu::WarpExchange& ex = m.warps[m.current / 32];
  ex.d[lane][0] = v;
  emu::warp_rendezvous();
  const float other = ex.d[lane ^ (lane_mask & 31)][0];
  emu::warp_rendezvous();
  return other;
}

}  // namespace ptx
}  // namespace lora_kernels

namespace emu {
// An input allocation some of whose bytes must never be read (past an adapter's rank, gaps
// between rows): any access to them is a fault.
inline void register_input(const std::string& name, void* base, size_t bytes, const std::vector<uint8_t>* unreadable) {
  machine().allocs.push_back({name, static_cast<unsigned char*>(base), bytes, nullptr, unreadable});
}
}  // namespace emu
