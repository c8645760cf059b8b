// Multi-adapter (segmented) LoRA shrink and expand on CUDA (torch-free).
//
//   shrink:  t[tok, j] = scales[i] * sum_k x[tok, k] A[i, j, k]   for j < rank_i, else 0  (fp32)
//   expand:  y[tok, n] += sum_{j < rank_i} t[tok, j] B[i, n, j]   (fp32 sum, rounded once)
//
// with i the adapter slot of token `tok` and rank_i = ranks[i] clamped to [0, R] (R = r_max <= 512);
// tokens with no adapter (slot -1) get t = 0 and their rows of y are never stored to. One launch
// does up to 4 output slices s (q/k/v, gate/up): t[s] from A_s, and y's columns
// [col_s, col_s + N_s) from t[s] and B_s, each slice with its own stack, strides and width.
//
// Work comes from the AdapterIndex's work list, exactly as in lora_kernels/triton/multi_lora.py:
// one CTA per (piece, rank chunk, slice) for the shrink and per (piece, 128 output columns, slice)
// for the expand, a piece being up to item_m sorted positions of one slot; the expand walks ranks
// past 128 in 128-wide chunks of t staged in shared memory, summing into the same registers.
// Inside a CTA:
//  * a piece of <= kGemvMaxRows tokens (decode) runs on CUDA cores: every thread streams its share
//    of the adapter from global memory with 16-byte loads and applies each element to all of the
//    piece's tokens from registers; partial sums meet through warp shuffles and shared memory in
//    a fixed order. No tensor-core tile, no staging: a 1-token piece costs the adapter's bytes.
//  * a longer piece runs on tensor cores: the shrink streams x rows (gathered through
//    sorted_tokens) and A through a cp.async pipeline into shared memory (mma.sync m16n8k16; an
//    fp32 A is split into 16-bit high and low halves as it is staged, two products); the expand
//    reads each B element once into tf32 MMA fragments and reuses it over the piece's rows, with
//    t kept fp32-accurate by splitting it into tf32 high and low parts (fp32 B: "3xTF32").
// Entries of A, B and t at or past an adapter's rank are never read, and neither are rows past a
// piece's length. Every output element is written by exactly one thread with a fixed order of
// accumulation: deterministic, no atomics.
#pragma once

#include <stdint.h>

#include "multi_lora/multi_lora_plan.h"
#include "common/tile_common.cuh"  // Fp16 / Bf16 and the tile pieces shared with the fused forward

namespace lora_kernels {
namespace multi {

struct Piece {
  int slot;
  int64_t start;
  int length;
};

// A slot outside [-1, L) (a work list not built by AdapterIndex) is read as -1, the no-adapter
// group, as the Triton kernels treat invalid ids: ranks, scales, A and B are never indexed with
// it. It is reported through `bad_slot` (when given) with a plain store of 1: every writer
// stores the same value, so the race is benign.
LK_DEVICE Piece load_piece(const int32_t* work, int64_t item, int L, int32_t* bad_slot) {
  Piece pc;
  pc.slot = ptx::ld_global_s32(work + item * 3);
  if (pc.slot < -1 || pc.slot >= L) {
    if (bad_slot != nullptr) *bad_slot = 1;
    pc.slot = -1;
  }
  pc.start = ptx::ld_global_s32(work + item * 3 + 1);
  pc.length = ptx::ld_global_s32(work + item * 3 + 2);
  return pc;
}

// The rank used for `slot`: ranks[slot] clamped to [0, R] (a bad entry never reads past the
// stack; the op reports it separately), R without a ranks vector, 0 for the no-adapter group.
LK_DEVICE int rank_of(const int32_t* ranks, int slot, int R) {
  if (slot < 0) return 0;
  if (ranks == nullptr) return R;
  const int r = ptx::ld_global_s32(ranks + slot);
  return r < 0 ? 0 : (r > R ? R : r);
}

LK_DEVICE int min_int(int a, int b) { return a < b ? a : b; }

// Row `s` of a launch's per-slice table, by compares and selects over the fixed number of rows
// (a dynamic index into the kernel parameters costs registers or local memory).
template <class T>
LK_DEVICE T pick_slice(const T (&slices)[kMultiMaxSlices], int s) {
  T v = slices[0];
#pragma unroll
  for (int i = 1; i < kMultiMaxSlices; ++i)
    if (s == i) v = slices[i];
  return v;
}

// Eight consecutive elements [k, k + 8) of a row as fp32, zeros at or past `limit`: one 16-byte
// load when `vec` (row 16-byte aligned, unit stride) and the whole vector is in range, else
// element loads with stride `stride`.
template <class Ty>
LK_DEVICE void load8(const uint16_t* row, int64_t k, int64_t limit, bool vec, int64_t stride, float (&v)[8]) {
  if (vec && k + 8 <= limit) {
    uint32_t w[4];
    ptx::ld_global_v4(w, row + k);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = Ty::to_f32(uint16_t(w[i] & 0xFFFFu));
      v[2 * i + 1] = Ty::to_f32(uint16_t(w[i] >> 16));
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = k + i < limit ? Ty::to_f32(ptx::ld_global_u16(row + (k + i) * stride)) : 0.0f;
  }
}

template <class Ty>
LK_DEVICE void load8(const float* row, int64_t k, int64_t limit, bool vec, int64_t stride, float (&v)[8]) {
  if (vec && k + 8 <= limit) {
    uint32_t w[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      ptx::ld_global_v4(w, row + k + 4 * h);
#pragma unroll
      for (int i = 0; i < 4; ++i) v[4 * h + i] = ptx::u32_as_f32(w[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = k + i < limit ? ptx::ld_global_f32(row + (k + i) * stride) : 0.0f;
  }
}

LK_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset >= 1; offset >>= 1) v += ptx::shfl_xor_f32(v, offset);
  return v;  // the same bits on every lane: each step adds the same two values in either order
}

// ================================================================================================
// Shrink
// ================================================================================================
template <class Ty, class Cfg>
struct MultiShrinkCta {
  static constexpr int BM = Cfg::BM, RB = Cfg::RB, BK = Cfg::BK, LDS = Cfg::LDS, STAGES = Cfg::STAGES;
  static constexpr int MT = Cfg::MT, NT = Cfg::NT, WM = Cfg::WM, WN = Cfg::WN;
  static constexpr int NTHREADS = Cfg::NTHREADS, NWARPS = NTHREADS / 32;
  static constexpr int G = kGemvMaxRows, JR = kGemvRankRows;

  const MultiShrinkParams& p;
  unsigned char* smem;
  int tid, lane, warp, warp_m, warp_n, warp_k;
  int slot = -1, length = 0, r0 = 0, used_end = 0;  // rank columns [r0, used_end) are computed here
  float scale = 0.0f;
  const void* a_slice = nullptr;  // this CTA's slice: its A stack
  float* t = nullptr;             // and its t [M, R]

  LK_DEVICE MultiShrinkCta(const MultiShrinkParams& p_, unsigned char* smem_, int tid_)
      : p(p_), smem(smem_), tid(tid_), lane(tid_ % 32), warp(tid_ / 32) {
    tile::warp_coords<Cfg>(warp, warp_m, warp_n, warp_k);
  }

  LK_DEVICE int32_t* tok_s() const { return reinterpret_cast<int32_t*>(smem + Cfg::tok_off); }
  LK_DEVICE float* red() const { return reinterpret_cast<float*>(smem + Cfg::red_off); }
  LK_DEVICE uint16_t* xs(int s) const { return reinterpret_cast<uint16_t*>(smem + Cfg::xs_off) + s * BM * LDS; }
  LK_DEVICE uint16_t* as(int s) const { return reinterpret_cast<uint16_t*>(smem + Cfg::as_off) + s * RB * LDS; }
  LK_DEVICE uint16_t* as_lo(int s) const { return reinterpret_cast<uint16_t*>(smem + Cfg::as_lo_off) + s * RB * LDS; }

  LK_DEVICE int64_t tok(int i) const { return ptx::ld_shared_s32(tok_s() + i); }
  LK_DEVICE const uint16_t* x_row(int i) const { return p.x + tok(i) * p.ldx; }
  LK_DEVICE int64_t a_row_offset(int j) const { return int64_t(slot) * p.lda_l + int64_t(j) * p.lda_r; }
  LK_DEVICE float* t_at(int i, int j) const { return t + tok(i) * p.ldt + j; }

  // ---- CUDA-core path (pieces of <= G tokens) -------------------------------------------------
  // Passes of JR rank rows; in each, thread `tid` takes the 8-element K vectors tid, tid + 128, ...
  // of the piece's x rows and of each rank row of A, so consecutive threads read consecutive
  // 16 bytes of a row (coalesced), and every A element is loaded once and used for all G tokens.
  template <class AT>
  LK_DEVICE void gemv(const AT* a) {
    int64_t xrow[G];
#pragma unroll
    for (int g = 0; g < G; ++g) xrow[g] = g < length ? tok(g) * p.ldx : 0;
    float* partial = red();  // [NWARPS][G][JR]
    for (int jc = r0; jc < used_end; jc += JR) {
      float acc[G][JR];
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int jj = 0; jj < JR; ++jj) acc[g][jj] = 0.0f;
      // Rank row jc of the slot; row jc + jj is jj * lda_r on (not a_row_offset(jc + jj): with the
      // slice's A in a register, nvcc then keeps 16 row addresses live, about 30 registers more).
      const AT* a_pass = a + a_row_offset(jc);
      for (int64_t k = int64_t(tid) * 8; k < p.K; k += int64_t(NTHREADS) * 8) {
        float xv[G][8];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          if (g < length) load8<Ty>(p.x + xrow[g], k, p.K, p.x_vec, 1, xv[g]);
        }
#pragma unroll
        for (int jj = 0; jj < JR; ++jj) {
          if (jc + jj < used_end) {
            float av[8];
            load8<Ty>(a_pass + int64_t(jj) * p.lda_r, k, p.K, p.a_vec, 1, av);
#pragma unroll
            for (int g = 0; g < G; ++g) {
              if (g < length) {
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[g][jj] += xv[g][i] * av[i];
              }
            }
          }
        }
      }
      // Sum over the warp (shuffles), then over the warps in order (shared memory).
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (g < length) {
#pragma unroll
          for (int jj = 0; jj < JR; ++jj) {
            if (jc + jj < used_end) {
              const float s = warp_sum(acc[g][jj]);
              if (lane == 0) ptx::st_shared_f32(partial + (warp * G + g) * JR + jj, s);
            }
          }
        }
      }
      ptx::cta_sync();
      for (int e = tid; e < length * JR; e += NTHREADS) {
        const int g = e / JR, jj = e % JR;
        if (jc + jj >= used_end) continue;
        float s = 0.0f;
        for (int w = 0; w < NWARPS; ++w) s += ptx::ld_shared_f32(partial + (w * G + g) * JR + jj);
        ptx::st_global_f32(t_at(g, jc + jj), scale * s);
      }
      ptx::cta_sync();  // partial is rewritten by the next pass
    }
  }

  // ---- tensor-core path ------------------------------------------------------------------------
  // An fp32 A tile, split as it is staged: A = hi + lo with hi = A rounded to 16 bits and lo the
  // remainder rounded to 16 bits (about 16 significant bits of A for bf16, 22 for fp16).
  LK_DEVICE void load_a_split(int s, int64_t k0) const {
    const float* a = static_cast<const float*>(a_slice);
    for (int e = tid; e < RB * BK; e += NTHREADS) {
      const int j = e / BK, k = e % BK;
      const int64_t gk = k0 + k;
      const float v = r0 + j < used_end && gk < p.K ? ptx::ld_global_f32(a + a_row_offset(r0 + j) + gk) : 0.0f;
      const uint16_t hi = Ty::from_f32(v);
      ptx::st_shared_u16(as(s) + j * LDS + k, hi);
      ptx::st_shared_u16(as_lo(s) + j * LDS + k, Ty::from_f32(v - Ty::to_f32(hi)));
    }
  }

  LK_DEVICE void load_stage(int s, int64_t kt) const {
    const int64_t k0 = kt * BK;
    tile::load_tile<BM, Cfg>(
        xs(s), [&](int r) { return r < length ? x_row(r) : static_cast<const uint16_t*>(nullptr); }, k0, p.K,
        p.x_vec, p.x, tid);
    if (p.a_fp32) {
      load_a_split(s, k0);
    } else {
      const uint16_t* a = static_cast<const uint16_t*>(a_slice);
      tile::load_tile<RB, Cfg>(
          as(s), [&](int j) { return r0 + j < used_end ? a + a_row_offset(r0 + j) : static_cast<const uint16_t*>(nullptr); },
          k0, p.K, p.a_vec, a_slice, tid);
    }
  }

  LK_DEVICE void compute_stage(int s, float (&tacc)[MT][NT][4]) const {
    const uint16_t* x_tile = xs(s);
#pragma unroll
    for (int i = 0; i < Cfg::KSTEPS / Cfg::WARPS_K; ++i) {
      const int kk = (i * Cfg::WARPS_K + warp_k) * 16;
      uint32_t af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row0 = warp_m * WM + mt * 16;
        if (row0 < length) ptx::ldmatrix_x4(af[mt], x_tile + (row0 + (lane & 15)) * LDS + kk + (lane >> 4) * 8);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int col0 = warp_n * WN + nt * 8;
        if (r0 + col0 >= used_end) continue;  // wholly past the rank: stays zero
        const int half = p.a_fp32 ? 2 : 1;
        for (int h = 0; h < half; ++h) {
          uint32_t bf[2];
          ptx::ldmatrix_x2(bf, (h == 0 ? as(s) : as_lo(s)) + (col0 + (lane & 7)) * LDS + kk + ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            if (warp_m * WM + mt * 16 < length) ptx::mma_m16n8k16<Ty::kBf16>(tacc[mt][nt], af[mt], bf);
          }
        }
      }
    }
  }

  LK_DEVICE void mma() {
    float tacc[MT][NT][4];
    tile::zero(tacc);
    tile::k_pipeline<STAGES>(ceil_div(p.K, BK), [&](int s, int64_t kt) { load_stage(s, kt); },
                             [&](int s) { compute_stage(s, tacc); });
    tile::reduce_k_split<Cfg>(red(), warp_m, warp_n, warp_k, lane, tacc);
    if (warp_k != 0) return;
    const int g = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {  // D fragment: (g, c2), (g, c2+1), (g+8, c2), (g+8, c2+1)
          const int row = warp_m * WM + mt * 16 + g + (e >> 1) * 8;
          const int col = r0 + warp_n * WN + nt * 8 + c2 + (e & 1);
          if (row < length && col < used_end) ptx::st_global_f32(t_at(row, col), scale * tacc[mt][nt][e]);
        }
  }

  LK_DEVICE void run(int64_t item, int chunk, int slice) {
    const Piece pc = load_piece(p.work, item, p.L, p.bad_slot);
    // Split decode shrink: grid y = rank chunk * kDecodeRowSplit + sub-piece of G rows.
    static_assert(kDecodeRowSplit == 4 && kDecodeRowSplit * G == kShrinkSmall, "4 sub-pieces of G rows");
    const bool split = p.row_split > 1;
    const int first = split ? (chunk & 3) * G : 0;  // the sub-piece's first row in the piece
    if (split) chunk >>= 2;
    length = min_int(min_int(pc.length, BM), p.item_m) - first;
    if (split) length = min_int(length, G);
    if (length <= 0) return;  // padding row of the work list (or past the piece's length)
    slot = pc.slot;
    a_slice = pick_slice(p.a, slice);
    t = p.t + int64_t(slice) * p.ldt_s;
    r0 = chunk * RB;
    const int cols_end = min_int(r0 + RB, p.R);  // t columns [r0, cols_end) belong to this CTA
    const int rank = rank_of(p.ranks, slot, p.R);
    used_end = min_int(cols_end, rank);
    for (int i = tid; i < length; i += NTHREADS)
      ptx::st_shared_s32(tok_s() + i, ptx::ld_global_s32(p.sorted_tokens + pc.start + first + i));
    ptx::cta_sync();
    if (used_end > r0) {
      scale = ptx::ld_global_f32(p.scales + slot);
      if (length <= G) {
        if (p.a_fp32) gemv(static_cast<const float*>(a_slice));
        else gemv(static_cast<const uint16_t*>(a_slice));
      } else {
        mma();
      }
    }
    // Columns past the rank (all of them for the no-adapter group) are zeros.
    const int z0 = used_end > r0 ? used_end : r0, nz = cols_end - z0;
    for (int e = tid; e < length * nz; e += NTHREADS) ptx::st_global_f32(t_at(e / nz, z0 + e % nz), 0.0f);
  }
};

// ================================================================================================
// Expand
// ================================================================================================
// The two launch values add_rank_product reads (tile_common.cuh): the slice's width, B's dtype.
struct ExpandRankArgs {
  int64_t N;
  bool b_fp32;
};

template <class Ty>
struct MultiExpandCta {
  using C = ExpandConfig;
  static constexpr int BM = C::BM, BN = C::BN, WN = C::WN, NT = C::NT, MT = C::MT, TPITCH = C::TPITCH, RC = C::RC;
  static constexpr int NTHREADS = C::NTHREADS, G = kGemvMaxRows;

  const MultiExpandParams& p;
  unsigned char* smem;
  int tid, lane, warp;
  int slot = -1, length = 0, rank = 0;
  int64_t n0 = 0;          // first column of this CTA's tile, in the slice
  MultiExpandSlice sl{};   // this CTA's slice: its B stack, width and first column of y
  const float* t = nullptr;  // and its t [M, R]

  LK_DEVICE MultiExpandCta(const MultiExpandParams& p_, unsigned char* smem_, int tid_)
      : p(p_), smem(smem_), tid(tid_), lane(tid_ % 32), warp(tid_ / 32) {}

  LK_DEVICE int32_t* tok_s() const { return reinterpret_cast<int32_t*>(smem + C::tok_off); }
  LK_DEVICE float* ts() const { return reinterpret_cast<float*>(smem + C::ts_off); }
  LK_DEVICE int64_t tok(int i) const { return ptx::ld_shared_s32(tok_s() + i); }

  // y[tok(row), col + n] = round(y + delta): read and written by this thread only.
  LK_DEVICE void update_y(int row, int64_t n, float delta) const {
    uint16_t* dst = p.y + tok(row) * p.ldy_m + (sl.col + n) * p.ldy_n;
    ptx::st_global_u16(dst, Ty::from_f32(Ty::to_f32(ptx::ld_global_u16_rw(dst)) + delta));
  }

  // The same for the adjacent outputs n, n + 1 (n even, sl.y_pairs): one 32-bit load and store,
  // each half rounded as update_y does.
  LK_DEVICE void update_y_pair(int row, int64_t n, float d0, float d1) const {
    uint32_t* dst = reinterpret_cast<uint32_t*>(p.y + tok(row) * p.ldy_m + (sl.col + n));
    const uint32_t v = ptx::ld_global_u32_rw(dst);
    const uint32_t lo = Ty::from_f32(Ty::to_f32(uint16_t(v & 0xFFFFu)) + d0);
    const uint32_t hi = Ty::from_f32(Ty::to_f32(uint16_t(v >> 16)) + d1);
    ptx::st_global_u32(dst, lo | (hi << 16));
  }

  // t rows [0, rows_pad) x rank columns [rc, rc + RC) of the piece into shared memory, zero-padded
  // to whole MMA tiles (rows past the length, columns past the rank up to a multiple of 8); t's
  // columns at or past the rank are not read. The barrier before it (all but the first chunk)
  // lets every thread finish with the previous chunk.
  LK_DEVICE void stage_t(int rc, int rows_pad) const {
    if (rc > 0) ptx::cta_sync();
    const int rk = min_int(RC, rank - rc), rk_pad = (rk + 7) / 8 * 8;
    float* t_s = ts();
    for (int e = tid; e < rows_pad * rk_pad; e += NTHREADS) {
      const int i = e / rk_pad, j = e % rk_pad;
      const float v = i < length && j < rk ? ptx::ld_global_f32(t + tok(i) * p.ldt_m + int64_t(rc + j) * p.ldt_r) : 0.0f;
      ptx::st_shared_f32(t_s + i * TPITCH + j, v);
    }
    ptx::cta_sync();
  }

  // CUDA-core path: thread `tid` owns column n0 + tid; chunk by chunk of the rank it reads
  // B[slot, n, rc:rc + RC] (16-byte loads along the rank when B is rank-contiguous) once and
  // applies it to every token, the sums running on in the same registers over the chunks.
  template <class BT>
  LK_DEVICE void gemv(const BT* b) const {
    const float* t_s = ts();
    const int64_t n = n0 + tid;
    const bool has_col = n < sl.N;
    const BT* row = b + int64_t(slot) * sl.ldb_l + n * sl.ldb_n;
    float acc[G];
#pragma unroll
    for (int g = 0; g < G; ++g) acc[g] = 0.0f;
    for (int rc = 0; rc < rank; rc += RC) {
      stage_t(rc, length);
      if (!has_col) continue;  // (every thread still reaches each chunk's barriers)
      const int rk = min_int(RC, rank - rc);
      const BT* chunk = row + int64_t(rc) * sl.ldb_r;
      for (int j = 0; j < rk; j += 8) {
        float bv[8];
        load8<Ty>(chunk, j, rk, sl.b_vec, sl.ldb_r, bv);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          if (g < length) {
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[g] += ptx::ld_shared_f32(t_s + g * TPITCH + j + i) * bv[i];
          }
        }
      }
    }
    if (!has_col) return;
#pragma unroll
    for (int g = 0; g < G; ++g)
      if (g < length) update_y(g, n, acc[g]);
  }

  // Tensor-core path: warp w owns columns [n0 + 32w, n0 + 32w + 32) and all row tiles of the
  // piece; one rank-deep product per rank chunk, into the same accumulators.
  LK_DEVICE void mma() const {
    const float* t_s = ts();
    const int g = lane >> 2, c = lane & 3;
    const int mtiles = (length + 15) / 16;
    const ExpandRankArgs args{sl.N, p.b_fp32};
    float acc[MT][NT][4];
    tile::zero(acc);
    for (int rc = 0; rc < rank; rc += RC) {
      stage_t(rc, mtiles * 16);
      const int rk = min_int(RC, rank - rc);
      // The warps split the columns only: every warp is warp row 0 and walks all the row tiles.
      tile::add_rank_product<0, WN>(
          args, acc, rk, n0, /*warp_m=*/0, /*warp_n=*/warp, lane,
          [&](int64_t n, int j) {
            const int64_t off = int64_t(slot) * sl.ldb_l + n * sl.ldb_n + int64_t(rc + j) * sl.ldb_r;
            return tile::load_f32<Ty>(p.b_fp32, sl.b, off);
          },
          [&](int mt) { return mt >= mtiles; },  // past the piece's rows
          [&](int r, int j) { return ptx::ld_shared_f32(t_s + r * TPITCH + j); });
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (mt >= mtiles) continue;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int64_t col = n0 + warp * WN + nt * 8 + 2 * c;
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // D fragment: (g, 2c), (g, 2c+1), then (g+8, 2c), (g+8, 2c+1)
          const int row = mt * 16 + g + h * 8;
          if (row >= length || col >= sl.N) continue;
          if (sl.y_pairs && col + 1 < sl.N) {
            update_y_pair(row, col, acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
          } else {
            update_y(row, col, acc[mt][nt][2 * h]);
            if (col + 1 < sl.N) update_y(row, col + 1, acc[mt][nt][2 * h + 1]);
          }
        }
      }
    }
  }

  LK_DEVICE void run(int64_t item, int ntile, int slice) {
    const Piece pc = load_piece(p.work, item, p.L, p.bad_slot);
    length = min_int(min_int(pc.length, BM), p.item_m);
    slot = pc.slot;
    rank = rank_of(p.ranks, slot, p.R);
    if (length <= 0 || rank == 0) return;  // no-adapter rows (and rank-0 slots) are never stored to
    sl = pick_slice(p.slices, slice);
    n0 = int64_t(ntile) * BN;
    if (n0 >= sl.N) return;  // past this slice's width (the grid covers the widest slice)
    t = p.t + int64_t(slice) * p.ldt_s;
    for (int i = tid; i < length; i += NTHREADS) ptx::st_shared_s32(tok_s() + i, ptx::ld_global_s32(p.sorted_tokens + pc.start + i));
    ptx::cta_sync();
    if (length <= G) {
      if (p.b_fp32) gemv(static_cast<const float*>(sl.b));
      else gemv(static_cast<const uint16_t*>(sl.b));
    } else {
      mma();
    }
  }
};

}  // namespace multi

template <class Ty, class Cfg>
LK_DEVICE void multi_shrink_cta(const MultiShrinkParams& p, unsigned char* smem, int64_t item, int chunk, int slice,
                                int tid) {
  multi::MultiShrinkCta<Ty, Cfg> cta(p, smem, tid);
  cta.run(item, chunk, slice);
}

template <class Ty>
LK_DEVICE void multi_expand_cta(const MultiExpandParams& p, unsigned char* smem, int64_t item, int ntile, int slice,
                                int tid) {
  multi::MultiExpandCta<Ty> cta(p, smem, tid);
  cta.run(item, ntile, slice);
}

#if defined(__CUDACC__) && !defined(LORA_KERNELS_HOST_EMULATION)
template <class Ty, class Cfg>
__global__ void __launch_bounds__(kMultiThreads) multi_shrink_kernel(const MultiShrinkParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  multi_shrink_cta<Ty, Cfg>(p, smem, int64_t(blockIdx.x), int(blockIdx.y), int(blockIdx.z), int(threadIdx.x));
}

template <class Ty>
__global__ void __launch_bounds__(kMultiThreads) multi_expand_kernel(const MultiExpandParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  multi_expand_cta<Ty>(p, smem, int64_t(blockIdx.x), int(blockIdx.y), int(blockIdx.z), int(threadIdx.x));
}
#endif

}  // namespace lora_kernels
