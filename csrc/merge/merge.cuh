// In-place merge / unmerge of a LoRA adapter into its weight (torch-free): the CUDA C++ twin of
// lora_kernels/triton/merge.py, with the same modes, the same rounding and the same exact codes.
//
//   delta[p, q] = scale * sum_j U[p, j] V[j, q]        fp32, formed on tensor cores, never stored
//   W'[p, q]    = round(W'[p, q] +- delta[p, q])       W read once, written once, one rounding
//
// on the canonical problem of merge_plan.h (W' = W, or W^T for a weight whose N dimension is the
// contiguous one). Each W element belongs to exactly one thread of one CTA, which reads it once
// (a 16-byte vector where the layout allows) and writes it once, so the in-place update needs no
// synchronisation between CTAs. Tiles, the column permutation and the bandwidth reasoning:
// merge_plan.h.
//
// Modes (MergeParams::mode, a runtime value: every mode runs the same MMA instructions for delta):
//  * kMergeApply: W = round(W +- delta).
//  * kMergeCountNonfinite: the first pass of a safe merge; writes nothing to W, adds the number of
//    non-finite round(W +- delta) to status[1] (one atomic per warp with any).
//  * kMergeExact: W1 = round(W0 + delta) and the int8 code from which kUnmergeExact restores W0
//    bit for bit (lora_kernels/reference.py: code = key(W0) - key(U), U = round(W1 - delta)).
//    Elements the code cannot restore go to the escape table: one atomic per warp with any
//    escapes, then slots by a warp prefix sum. Slot order differs from the Triton kernel's; the
//    unmerge scatters (index, value) pairs and does not depend on it. Past the table's end an
//    element is left unmerged with code PENDING (the op layer undoes the merge and retries).
//  * kUnmergeExact: W0 = key^-1(key(round(W1 - delta)) + code) for codes >= kCodeMinRestored; the
//    escaped elements are scattered afterwards (lora_kernels/cuda/merge.py), pending ones untouched.
// `gated`: the whole launch returns before touching W when status[1] != 0 (a failed count pass),
// so a safe merge needs no host sync between its two kernels.
//
// Determinism (what the exact unmerge relies on): kMergeExact and kUnmergeExact must compute
// bit-identical deltas. They are one kernel (the mode is a runtime argument, so the MMAs that sum
// delta are literally the same machine code), the tile walk and the MMA order depend only on the
// shapes, and every fp32 operation outside the MMAs uses round-to-nearest intrinsics
// (ptx::fmul_rn / fadd_rn / fsub_rn) that the compiler never contracts into an FMA. Were
// `w1 - scale * acc` contracted into one FMA in the unmerge but rounded twice in the merge (or
// the other way round), U would differ in its last bit and the code would restore the wrong W0;
// with the intrinsics it rounds twice in both, as in the Triton kernel (launched with
// enable_fp_fusion=False) and the reference, whatever nvcc's -fmad setting. The bf16 rounding is done with integer ops (NaN -> 0x7FC0, as torch and Triton),
// fp16 with cvt.rn.f16.f32 (as Triton's .to(float16)).
//
// Numerics of delta: 16-bit adapters (the weight's dtype) go straight into m16n8k16 MMAs: exact
// products, fp32 sums. fp32 adapters (and the op layer's packed multi-adapter pair) go through
// 3xTF32 m16n8k8 MMAs (hi/lo split of both operands, lo*lo dropped): fp32-accurate, like the
// Triton kernel's "tf32x3". So CUDA and Triton agree bitwise wherever the fp32 sums are exact
// and to within fp32 rounding of delta elsewhere; an exact merge must be unmerged by the backend
// that made it (the residual records it).
#pragma once

#include <stdint.h>

#include <type_traits>

#include "merge/merge_plan.h"
#ifndef LORA_KERNELS_HOST_EMULATION
#include "common/ptx_stream.cuh"
#endif

namespace lora_kernels {

// ------------------------------------------------------------------------------------------------
// Weight element types: raw bits in registers (NaN payloads survive untouched elements), fp32 for
// arithmetic, one rounding back.
// ------------------------------------------------------------------------------------------------
struct MergeFp16 {
  using Bits = uint16_t;
  static constexpr bool kBf16 = false;
  LK_DEVICE static float to_f32(Bits b) { return ptx::f16_to_f32(b); }
  LK_DEVICE static Bits round(float x) { return ptx::f32_to_f16(x); }
};
struct MergeBf16 {
  using Bits = uint16_t;
  static constexpr bool kBf16 = true;
  LK_DEVICE static float to_f32(Bits b) { return ptx::bf16_to_f32(b); }
  // Round to nearest even, NaN -> the canonical 0x7FC0: bit for bit the Triton kernel's _round_to.
  LK_DEVICE static Bits round(float x) {
    if (x != x) return Bits(0x7FC0);
    const uint32_t bits = ptx::f32_as_u32(x);
    return Bits((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
};
struct MergeFp32 {
  using Bits = uint32_t;
  static constexpr bool kBf16 = false;
  LK_DEVICE static float to_f32(Bits b) { return ptx::u32_as_f32(b); }
  LK_DEVICE static Bits round(float x) { return ptx::f32_as_u32(x); }
};

// reference.ordered_bits: +0 -> 0, -0 -> -1, neighbouring values -> neighbouring integers. Key is
// int32 for 16-bit weights (keys and key + code fit) and int64 for fp32.
template <class Key, class Bits>
LK_DEVICE Key merge_key(Bits b) {
  if constexpr (sizeof(Bits) == 2) {
    const int32_t s = int16_t(b);
    const int32_t mag = s & 0x7FFF;
    return s < 0 ? -mag - 1 : mag;
  } else {
    const int64_t s = int32_t(b);
    const int64_t mag = s & 0x7FFFFFFF;
    return s < 0 ? -mag - 1 : mag;
  }
}

// reference.from_ordered_bits (keys outside the dtype's range wrap, as there).
template <class Bits, class Key>
LK_DEVICE Bits merge_from_key(Key key) {
  const bool neg = key < 0;
  const int64_t mag = neg ? -int64_t(key) - 1 : int64_t(key);
  if constexpr (sizeof(Bits) == 2) return Bits(uint16_t(uint64_t(neg ? mag - 32768 : mag)));
  else return Bits(uint32_t(uint64_t(neg ? mag - 2147483648LL : mag)));
}

// ------------------------------------------------------------------------------------------------
// The CTA body. `pid` = blockIdx.x, `grid` = gridDim.x, `tid` = threadIdx.x, `smem` = dynamic
// shared memory of merge_smem_bytes(p.pitch, kAdapterF32) bytes.
// ------------------------------------------------------------------------------------------------
template <class Wt, bool kAdapterF32>
struct MergeCta {
  using Bits = typename Wt::Bits;
  using AElem = std::conditional_t<kAdapterF32, float, uint16_t>;
  using Key = std::conditional_t<sizeof(Bits) == 2, int32_t, int64_t>;
  static_assert(kAdapterF32 || sizeof(Bits) == 2, "16-bit adapters only over a 16-bit weight of their dtype");
  static constexpr int VE = merge_vec_elems(int(sizeof(Bits)));   // elements per 16-byte vector
  static constexpr int E = kMergeElemsPerThreadRow;              // elements per thread per row
  static constexpr int NV = E / VE;                               // vectors per thread per row
  static constexpr int KMMA = kAdapterF32 ? 8 : 16;               // MMA k (rank per step)
  static constexpr float kFltMax = 3.4028234663852886e38f;

  // One thread's share of a tile: rows g and g + 8, E columns each, packed into 32-bit words (W's
  // raw bits, and int8 codes four to a word) so that they take the fewest registers. Every index
  // below is a compile-time constant after unrolling: a runtime index would move them to local memory.
  static constexpr int WW = E * int(sizeof(Bits)) / 4;  // W words per row
  struct Regs {
    uint32_t w[2][WW];
  };
  struct Codes {
    uint32_t code[2][E / 4];
  };
  // The next tile's W is prefetched into registers for 16-bit weights (2 x 64 bytes a thread in
  // flight). An fp32 weight already has 128 bytes a thread in flight per tile, and a second copy
  // would not fit 128 registers (2 CTAs an SM), so it is loaded at the start of its own tile.
  static constexpr bool kPrefetch = sizeof(Bits) == 2;
  LK_DEVICE static Bits get_w(const Regs& r, int h, int i) {
    if constexpr (sizeof(Bits) == 2) return Bits(r.w[h][i / 2] >> (16 * (i % 2)));
    else return r.w[h][i];
  }
  LK_DEVICE static void set_w(Regs& r, int h, int i, Bits b) {
    if constexpr (sizeof(Bits) == 2) {
      const int s = 16 * (i % 2);
      r.w[h][i / 2] = (r.w[h][i / 2] & ~(0xFFFFu << s)) | (uint32_t(b) << s);
    } else {
      r.w[h][i] = b;
    }
  }
  LK_DEVICE static int get_code(const Codes& r, int h, int i) { return int8_t(uint8_t(r.code[h][i / 4] >> (8 * (i % 4)))); }
  LK_DEVICE static void set_code(Codes& r, int h, int i, int code) {
    const int s = 8 * (i % 4);
    r.code[h][i / 4] = (r.code[h][i / 4] & ~(0xFFu << s)) | (uint32_t(uint8_t(code)) << s);
  }

  const MergeParams& p;
  unsigned char* smem;
  int tid, lane, g, c, wp, wq;

  LK_DEVICE MergeCta(const MergeParams& p_, unsigned char* smem_, int tid_)
      : p(p_), smem(smem_), tid(tid_), lane(tid_ % 32), g((tid_ % 32) / 4), c(tid_ % 4) {
    const int warp = tid_ / 32;
    wp = warp / kMergeWarpsQ;
    wq = warp % kMergeWarpsQ;
  }

  LK_DEVICE AElem* us() const { return reinterpret_cast<AElem*>(smem); }
  LK_DEVICE AElem* vs() const { return reinterpret_cast<AElem*>(smem) + kMergeTileP * p.pitch; }

  // This thread's row h (0, 1) and the first column of its vector v, in a tile at (p0, q0).
  LK_DEVICE int64_t row(int64_t p0, int h) const { return p0 + wp * kMergeWarpRows + g + 8 * h; }
  LK_DEVICE int64_t col(int64_t q0, int v) const { return q0 + wq * kMergeWarpCols + v * 4 * VE + c * VE; }

  // Tile t (strip-major: down each 128-column strip) starts at (p0, q0). Tile counts fit in 32
  // bits (the launcher checks), which saves registers.
  LK_DEVICE void tile_origin(int t, int64_t& p0, int64_t& q0, int& strip) const {
    const int p_tiles = int((p.P + kMergeTileP - 1) / kMergeTileP);
    strip = t / p_tiles;
    p0 = (t % p_tiles) * kMergeTileP;
    q0 = strip * kMergeTileQ;
  }

  // ---- W and codes: global <-> registers ------------------------------------------------------
  LK_DEVICE Bits* w_at(int64_t pp, int64_t qq) const {
    return static_cast<Bits*>(p.w) + pp * p.ldw_p + qq * p.ldw_q;
  }
  LK_DEVICE int8_t* code_at(int64_t pp, int64_t qq) const { return p.codes + pp * p.ldc_p + qq * p.ldc_q; }

  LK_DEVICE static Bits ld_scalar(const Bits* a) {
    if constexpr (sizeof(Bits) == 2) return ptx::ld_global_cs_u16(a);
    else return ptx::ld_global_cs_u32(a);
  }
  LK_DEVICE static void st_scalar(Bits* a, Bits v) {
    if constexpr (sizeof(Bits) == 2) ptx::st_global_cs_u16(a, v);
    else ptx::st_global_cs_u32(a, v);
  }

  // For each of this thread's vectors v (VE consecutive columns from q = col(q0, v)) on its rows
  // h inside W (row pp): whole(h, v, pp, q) where `vec` and the vector lies inside W (one access
  // of the whole vector), else element(h, i, pp, q + e) for each of its columns inside W, with
  // i = v * VE + e this thread's element index. Fully unrolled: h, v and i are constants. `vec`
  // is the parameter itself (a reference), read where it is tested as before: a copy taken up
  // front changes nvcc's register allocation of the sm_80 kernels.
  template <class Whole, class Element>
  LK_DEVICE void for_each_vector(int64_t p0, int64_t q0, const bool& vec, Whole&& whole, Element&& element) const {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t pp = row(p0, h);
      if (pp >= p.P) continue;
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        const int64_t q = col(q0, v);
        if (vec && q + VE <= p.Q) {
          whole(h, v, pp, q);
        } else {
#pragma unroll
          for (int e = 0; e < VE; ++e)
            if (q + e < p.Q) element(h, v * VE + e, pp, q + e);
        }
      }
    }
  }

  LK_DEVICE void load_w(Regs& r, int64_t p0, int64_t q0) const {
    for_each_vector(
        p0, q0, p.w_vec,
        [&](int h, int v, int64_t pp, int64_t q) {
          const ptx::Vec16 x = ptx::ld_global_cs_v4(w_at(pp, q));
#pragma unroll
          for (int k = 0; k < 4; ++k) r.w[h][v * 4 + k] = x.w[k];
        },
        [&](int h, int i, int64_t pp, int64_t q) { set_w(r, h, i, ld_scalar(w_at(pp, q))); });
  }

  LK_DEVICE void store_w(const Regs& r, int64_t p0, int64_t q0) const {
    for_each_vector(
        p0, q0, p.w_vec,
        [&](int h, int v, int64_t pp, int64_t q) {
          ptx::Vec16 x;
#pragma unroll
          for (int k = 0; k < 4; ++k) x.w[k] = r.w[h][v * 4 + k];
          ptx::st_global_cs_v4(w_at(pp, q), x);
        },
        [&](int h, int i, int64_t pp, int64_t q) { st_scalar(w_at(pp, q), get_w(r, h, i)); });
  }

  // Codes: VE of them per vector (8 bytes for a 16-bit weight, 4 for fp32).
  LK_DEVICE void load_codes(Codes& r, int64_t p0, int64_t q0) const {
    for_each_vector(
        p0, q0, p.c_vec,
        [&](int h, int v, int64_t pp, int64_t q) {
          if constexpr (VE == 8) {
            const uint64_t x = ptx::ld_global_cs_u64(reinterpret_cast<const uint64_t*>(code_at(pp, q)));
            r.code[h][2 * v] = uint32_t(x);
            r.code[h][2 * v + 1] = uint32_t(x >> 32);
          } else {
            r.code[h][v] = ptx::ld_global_cs_u32(reinterpret_cast<const uint32_t*>(code_at(pp, q)));
          }
        },
        [&](int h, int i, int64_t pp, int64_t q) { set_code(r, h, i, ptx::ld_global_cs_s8(code_at(pp, q))); });
  }

  LK_DEVICE void store_codes(const Codes& r, int64_t p0, int64_t q0) const {
    for_each_vector(
        p0, q0, p.c_vec,
        [&](int h, int v, int64_t pp, int64_t q) {
          if constexpr (VE == 8) {
            const uint64_t x = uint64_t(r.code[h][2 * v]) | (uint64_t(r.code[h][2 * v + 1]) << 32);
            ptx::st_global_cs_u64(reinterpret_cast<uint64_t*>(code_at(pp, q)), x);
          } else {
            ptx::st_global_cs_u32(reinterpret_cast<uint32_t*>(code_at(pp, q)), r.code[h][v]);
          }
        },
        [&](int h, int i, int64_t pp, int64_t q) { ptx::st_global_cs_s8(code_at(pp, q), int8_t(get_code(r, h, i))); });
  }

  // ---- adapters: global -> shared -------------------------------------------------------------
  LK_DEVICE static AElem ld_adapter(const AElem* a) {
    if constexpr (kAdapterF32) return ptx::ld_global_f32(a);
    else return ptx::ld_global_u16(a);
  }
  LK_DEVICE static void st_adapter(AElem* s, AElem v) {
    if constexpr (kAdapterF32) ptx::st_shared_f32(s, v);
    else ptx::st_shared_u16(s, v);
  }

  // U[p0 .. p0 + 64, j0 .. j0 + cols) -> us [64][pitch], zeros outside U. The loop order follows
  // U's smaller stride, so consecutive threads read consecutive addresses.
  LK_DEVICE void fill_u(int64_t p0, int j0, int cols) const {
    const AElem* u = static_cast<const AElem*>(p.u);
    const bool rank_fastest = p.ldu_r <= p.ldu_p;
    const int n = kMergeTileP * cols;
    for (int e = tid; e < n; e += kMergeThreads) {
      const int r = rank_fastest ? e / cols : e % kMergeTileP;
      const int j = rank_fastest ? e % cols : e / kMergeTileP;
      const int64_t pp = p0 + r;
      const int jj = j0 + j;
      const AElem x = (pp < p.P && jj < p.rank) ? ld_adapter(u + pp * p.ldu_p + int64_t(jj) * p.ldu_r) : AElem(0);
      st_adapter(us() + r * p.pitch + j, x);
    }
  }

  // V[j0 .. j0 + cols, strip columns] -> vs [128][pitch] (V^T, rank along the row), row s holding
  // the column that MMA column s % 8 of n8 tile (s % 64) / 8 of warp column s / 64 stands for.
  LK_DEVICE void fill_vt(int64_t q0, int j0, int cols) const {
    const AElem* vg = static_cast<const AElem*>(p.v);
    const bool q_fastest = p.ldv_q <= p.ldv_r;
    const int n = kMergeTileQ * cols;
    for (int e = tid; e < n; e += kMergeThreads) {
      const int s = q_fastest ? e % kMergeTileQ : e / cols;
      const int j = q_fastest ? e / kMergeTileQ : e % cols;
      const int local = s % kMergeWarpCols;
      const int64_t qq = q0 + (s / kMergeWarpCols) * kMergeWarpCols + merge_column(local / 8, local % 8, VE);
      const int jj = j0 + j;
      const AElem x = (qq < p.Q && jj < p.rank) ? ld_adapter(vg + int64_t(jj) * p.ldv_r + qq * p.ldv_q) : AElem(0);
      st_adapter(vs() + s * p.pitch + j, x);
    }
  }

  // ---- delta on tensor cores ------------------------------------------------------------------
  // acc[nt] += U[warp rows, chunk] . V[chunk, tile nt's columns] over `cols` rank columns.
  LK_DEVICE void mma_chunk(float (&acc)[kMergeNTiles][4], int cols) const {
    const AElem* u_rows = us() + (wp * kMergeWarpRows + (lane & 15)) * p.pitch;
    // ldmatrix.x4 of two n8 tiles: lanes 0-7 / 8-15 give tile nt's rows at k halves 0 / 1,
    // lanes 16-31 the same for tile nt + 1 (registers b0, b1 of nt, then b0, b1 of nt + 1).
    const AElem* v_rows = vs() + (wq * kMergeWarpCols + ((lane >> 4) << 3) + (lane & 7)) * p.pitch;
    constexpr int HALF = KMMA / 2;  // k offset of the second 8x8 matrix, in adapter elements
    for (int kk = 0; kk < cols; kk += KMMA) {
      uint32_t af[4];  // 16-bit: a0..a3 of m16n8k16; fp32: a0 (g, c) .. a3 (g + 8, c + 4) of m16n8k8
      ptx::ldmatrix_x4(af, reinterpret_cast<const uint16_t*>(u_rows + kk + (lane >> 4) * HALF));
      if constexpr (!kAdapterF32) {
#pragma unroll
        for (int nt = 0; nt < kMergeNTiles; nt += 2) {
          uint32_t bq[4];
          ptx::ldmatrix_x4(bq, v_rows + nt * 8 * p.pitch + kk + ((lane >> 3) & 1) * HALF);
          const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
          ptx::mma_m16n8k16<Wt::kBf16>(acc[nt], af, b0);
          ptx::mma_m16n8k16<Wt::kBf16>(acc[nt + 1], af, b1);
        }
      } else {
        uint32_t ahi[4], alo[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) split_tf32(af[i], ahi[i], alo[i]);
#pragma unroll
        for (int nt = 0; nt < kMergeNTiles; nt += 2) {
          uint32_t bq[4];
          ptx::ldmatrix_x4(bq, reinterpret_cast<const uint16_t*>(v_rows + nt * 8 * p.pitch + kk + ((lane >> 3) & 1) * HALF));
#pragma unroll
          for (int t = 0; t < 2; ++t) {
            uint32_t bhi[2], blo[2];
            split_tf32(bq[2 * t], bhi[0], blo[0]);
            split_tf32(bq[2 * t + 1], bhi[1], blo[1]);
            // 3xTF32, small terms first: a_lo.b_hi + a_hi.b_lo + a_hi.b_hi (a_lo.b_lo dropped)
            ptx::mma_m16n8k8_tf32(acc[nt + t], alo, bhi);
            ptx::mma_m16n8k8_tf32(acc[nt + t], ahi, blo);
            ptx::mma_m16n8k8_tf32(acc[nt + t], ahi, bhi);
          }
        }
      }
    }
  }

  LK_DEVICE static void split_tf32(uint32_t bits, uint32_t& hi, uint32_t& lo) {
    const float v = ptx::u32_as_f32(bits);
    hi = ptx::f32_to_tf32(v);
    lo = ptx::f32_to_tf32(ptx::fsub_rn(v, ptx::tf32_to_f32(hi)));
  }

  // ---- warp scan ------------------------------------------------------------------------------
  LK_DEVICE int warp_inclusive_sum(int x) const {
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int y = ptx::shfl_up_s32(x, d);
      if (lane >= d) x += y;
    }
    return x;
  }

  // ---- the elementwise part -------------------------------------------------------------------
  // Thread c's element i = v * VE + e of row h is accumulator column 2c + e % 2 of n8 tile
  // v * VE / 2 + e / 2 (merge_column), row g + 8h.
  LK_DEVICE float delta_of(const float (&acc)[kMergeNTiles][4], int h, int i) const {
    const int v = i / VE, e = i % VE;
    return ptx::fmul_rn(acc[v * (VE / 2) + e / 2][2 * h + (e & 1)], p.scale);
  }

  // f(h, i, valid) for each of this thread's elements, fully unrolled (constant register indices).
  template <class F>
  LK_DEVICE void for_each(int64_t p0, int64_t q0, F&& f) const {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const bool row_ok = row(p0, h) < p.P;
#pragma unroll
      for (int i = 0; i < E; ++i) f(h, i, row_ok && col(q0, i / VE) + i % VE < p.Q);
    }
  }

  // Turns `r` (the tile's W, and its codes for kUnmergeExact) into what is stored, per the mode,
  // and does the mode's atomics. acc holds sum_j U V (unscaled). One loop per mode: each is short
  // enough to stay in registers.
  LK_DEVICE void finish(Regs& r, Codes& k, const float (&acc)[kMergeNTiles][4], int64_t p0, int64_t q0) const {
    switch (p.mode) {
      case kMergeApply: {
        const bool subtract = p.subtract;
        for_each(p0, q0, [&](int h, int i, bool) {
          const float wf = Wt::to_f32(get_w(r, h, i)), delta = delta_of(acc, h, i);
          set_w(r, h, i, Wt::round(subtract ? ptx::fsub_rn(wf, delta) : ptx::fadd_rn(wf, delta)));
        });
        break;
      }
      case kMergeCountNonfinite: {
        const bool subtract = p.subtract;
        int count = 0;
        for_each(p0, q0, [&](int h, int i, bool valid) {
          const float wf = Wt::to_f32(get_w(r, h, i)), delta = delta_of(acc, h, i);
          const float f = Wt::to_f32(Wt::round(subtract ? ptx::fsub_rn(wf, delta) : ptx::fadd_rn(wf, delta)));
          count += (valid && !(f <= kFltMax && f >= -kFltMax)) ? 1 : 0;  // NaN compares false
        });
        const int total = warp_inclusive_sum(count);  // lane 31 holds the warp's total
        if (lane == 31 && total > 0) ptx::atomic_add_global_s32(p.status + 1, total);
        break;
      }
      case kMergeExact: {
        uint32_t escapes = 0;  // bit h * E + i: an escaped element, whose W is written once its slot is known
        int count = 0;
        for_each(p0, q0, [&](int h, int i, bool valid) {
          const Bits w0 = get_w(r, h, i);
          const float wf = Wt::to_f32(w0), delta = delta_of(acc, h, i);
          const Bits w1 = Wt::round(ptx::fadd_rn(wf, delta));
          const Bits u = Wt::round(ptx::fsub_rn(Wt::to_f32(w1), delta));  // what the unmerge computes
          const Key key0 = merge_key<Key>(w0);
          const Key q = key0 - merge_key<Key>(u);
          // A NaN W0 always escapes: float conversions need not keep a NaN's payload bits.
          const bool fits = q >= kCodeMin && q <= kCodeMax && wf == wf;
          const int code = fits ? int(q) : key0 == 0 ? kCodePosZero : key0 == -1 ? kCodeNegZero : kCodeEscape;
          set_code(k, h, i, code);
          if (code != kCodeEscape) {
            set_w(r, h, i, w1);
          } else if (valid) {
            escapes |= 1u << (h * E + i);
            ++count;
          }
        });
        assign_escapes(r, k, acc, p0, q0, escapes, count);
        break;
      }
      case kUnmergeExact: {
        for_each(p0, q0, [&](int h, int i, bool) {
          const int code = get_code(k, h, i);
          if (code < kCodeMinRestored) return;  // escaped: scattered afterwards; pending: never merged
          const Bits u = Wt::round(ptx::fsub_rn(Wt::to_f32(get_w(r, h, i)), delta_of(acc, h, i)));
          const Key key = code >= kCodeMin ? Key(merge_key<Key>(u) + code) : Key(code == kCodePosZero ? 0 : -1);
          set_w(r, h, i, merge_from_key<Bits>(key));
        });
        break;
      }
    }
  }

  // kMergeExact's escapes: one atomic per warp with any (rare), slots by the warp prefix sum; an
  // escape past the table's end keeps W0 and becomes PENDING. Called by every lane.
  LK_DEVICE void assign_escapes(Regs& r, Codes& k, const float (&acc)[kMergeNTiles][4], int64_t p0, int64_t q0,
                                uint32_t escapes, int count) const {
    const int inclusive = warp_inclusive_sum(count);
    const int total = ptx::shfl_idx_s32(inclusive, 31);
    if (total == 0) return;  // warp-uniform
    int base = 0;
    if (lane == 31) base = ptx::atomic_add_global_s32(p.status, total);
    int64_t slot = int64_t(ptx::shfl_idx_s32(base, 31)) + inclusive - count;
    if (escapes == 0) return;
#pragma unroll
    for (int b = 0; b < 2 * E; ++b) {
      const int h = b / E, i = b % E;
      if (!(escapes >> b & 1u)) continue;
      const Bits w0 = get_w(r, h, i);
      if (slot < p.esc_capacity) {
        const int64_t pp = row(p0, h), qq = col(q0, i / VE) + i % VE;
        ptx::st_global_s64(p.esc_index + slot, pp * p.idx_p + qq * p.idx_q);
        if constexpr (sizeof(Bits) == 2) ptx::st_global_u16(static_cast<uint16_t*>(p.esc_value) + slot, w0);
        else ptx::st_global_u32(static_cast<uint32_t*>(p.esc_value) + slot, w0);
        set_w(r, h, i, Wt::round(ptx::fadd_rn(Wt::to_f32(w0), delta_of(acc, h, i))));
      } else {
        set_code(k, h, i, kCodePending);  // W stays W0
      }
      ++slot;
    }
  }

  LK_DEVICE void run(int pid, int grid) {
    if (p.gated && ptx::ld_global_cg_s32(p.status + 1) != 0) return;  // uniform: before any barrier
    const int64_t tiles = merge_num_tiles(p.P, p.Q);
    const int first = int(int64_t(pid) * tiles / grid), end = int(int64_t(pid + 1) * tiles / grid);
    const int chunks = (p.rank + p.rank_chunk - 1) / p.rank_chunk;
    const bool codes_in = p.mode == kUnmergeExact;
    const bool writes = p.mode != kMergeCountNonfinite;
    const bool codes_out = p.mode == kMergeExact;
    Regs cur{}, nxt{};
    Codes codes{};
    int64_t p0 = 0, q0 = 0;
    int strip = 0, vt_strip = -1;
    if (kPrefetch && first < end) {
      tile_origin(first, p0, q0, strip);
      load_w(cur, p0, q0);
    }
    for (int t = first; t < end; ++t) {
      tile_origin(t, p0, q0, strip);
      if constexpr (kPrefetch) {
        if (t + 1 < end) {  // the next tile's loads stay in flight while this tile's delta forms
          int64_t np0, nq0;
          int nstrip;
          tile_origin(t + 1, np0, nq0, nstrip);
          load_w(nxt, np0, nq0);
        }
      } else {
        load_w(cur, p0, q0);
      }
      if (codes_in) load_codes(codes, p0, q0);
      float acc[kMergeNTiles][4];
#pragma unroll
      for (int nt = 0; nt < kMergeNTiles; ++nt)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[nt][k] = 0.0f;
      for (int ch = 0; ch < chunks; ++ch) {
        const int j0 = ch * p.rank_chunk;
        const int left = (p.rank - j0 + KMMA - 1) / KMMA * KMMA;
        const int cols = left < p.rank_chunk ? left : p.rank_chunk;
        ptx::cta_sync();  // every warp is done with the previous chunk's U (and V^T)
        fill_u(p0, j0, cols);
        if (chunks > 1 || strip != vt_strip) fill_vt(q0, j0, cols);
        ptx::cta_sync();
        mma_chunk(acc, cols);
      }
      vt_strip = strip;
      finish(cur, codes, acc, p0, q0);
      if (writes) store_w(cur, p0, q0);
      if (codes_out) store_codes(codes, p0, q0);
      if constexpr (kPrefetch) cur = nxt;
    }
  }
};

template <class Wt, bool kAdapterF32>
LK_DEVICE void merge_cta(const MergeParams& p, unsigned char* smem, int pid, int grid, int tid) {
  MergeCta<Wt, kAdapterF32> cta(p, smem, tid);
  cta.run(pid, grid);
}

#if defined(__CUDACC__) && !defined(LORA_KERNELS_HOST_EMULATION)
// At most 128 registers a thread (2 CTAs of 256 threads per SM): see merge_plan.h.
template <class Wt, bool kAdapterF32>
__global__ void __launch_bounds__(kMergeThreads, 2) merge_kernel(const MergeParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  merge_cta<Wt, kAdapterF32>(p, smem, int(blockIdx.x), int(gridDim.x), int(threadIdx.x));
}
#endif

}  // namespace lora_kernels
