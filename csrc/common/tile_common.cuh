// The tensor-core tile pieces that the fused forward (lora_linear.cuh), the segmented shrink /
// expand (multi_lora.cuh) and the fused multi-adapter linear (multi_lora_linear.cuh) share
// (torch-free). Each is the one copy of logic those kernels used to spell out alike: free function
// templates that take the tile shape (a Cfg: lora_linear_plan.h's TileConfig or multi_lora_plan.h's
// ShrinkConfig), the thread's place in the CTA and, as callables, what differs between the kernels
// (where a row comes from, which rows exist). Each does the same memory accesses, arithmetic and
// barriers in the same order as the copies it replaced; what a kernel does around them stays in its
// own header.
//
// Launch parameters are read where they are used, through the caller's parameter struct `p` (a
// duck-typed template argument: the fields named in each comment) or a reference, as the kernels
// did before. Passing them by value instead changes nvcc's register allocation of these kernels,
// several of which sit at the 255-register limit. (The fused forward's and the shrink's SASS did
// not change when their copies moved here.)
//
// Fragment layouts are those of mma.sync (PTX ISA, "Matrix fragments for mma.m16n8k16 / m16n8k8"):
// with g = lane / 4 and c = lane % 4, an m16n8 accumulator holds (g, 2c), (g, 2c+1), (g+8, 2c),
// (g+8, 2c+1).
#pragma once

#include <stdint.h>

#include "common/plan_common.h"  // ceil_div, LK_HOST_DEVICE
#ifndef LORA_KERNELS_HOST_EMULATION
#include "common/ptx.cuh"
#endif

namespace lora_kernels {

// ------------------------------------------------------------------------------------------------
// 16-bit element types.
// ------------------------------------------------------------------------------------------------
struct Fp16 {
  static constexpr bool kBf16 = false;
  LK_DEVICE static float to_f32(uint16_t v) { return ptx::f16_to_f32(v); }
  LK_DEVICE static uint16_t from_f32(float v) { return ptx::f32_to_f16(v); }
};
struct Bf16 {
  static constexpr bool kBf16 = true;
  LK_DEVICE static float to_f32(uint16_t v) { return ptx::bf16_to_f32(v); }
  LK_DEVICE static uint16_t from_f32(float v) { return ptx::f32_to_bf16(v); }
};

namespace tile {

// Warp `warp` of a Cfg CTA: warps are numbered K-split slice first, then M, then N.
template <class Cfg>
LK_DEVICE void warp_coords(int warp, int& warp_m, int& warp_n, int& warp_k) {
  warp_k = warp / Cfg::WARPS_MN;
  warp_m = (warp % Cfg::WARPS_MN) / Cfg::WARPS_N;
  warp_n = warp % Cfg::WARPS_N;
}

template <int MT, int NT>
LK_DEVICE void zero(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
}

// base[off] of an array that is fp32 (`fp32`) or 16-bit of type Ty, as fp32.
template <class Ty>
LK_DEVICE float load_f32(bool fp32, const void* base, int64_t off) {
  return fp32 ? ptx::ld_global_f32(static_cast<const float*>(base) + off)
              : Ty::to_f32(ptx::ld_global_u16(static_cast<const uint16_t*>(base) + off));
}

// v = hi + lo with hi, lo tf32 (hi exact in tf32, lo = the rest, itself rounded to tf32).
LK_DEVICE void split_tf32(float v, uint32_t& hi, uint32_t& lo) {
  hi = ptx::f32_to_tf32(v);
  lo = ptx::f32_to_tf32(v - ptx::tf32_to_f32(hi));
}

// Rows [0, ROWS) x columns [k0, k0 + BK) of a 16-bit matrix with K columns into a [ROWS][LDS]
// shared tile, by the CTA's NTHREADS threads; row r starts at row_ptr(r) (null: a row of zeros)
// and columns at or past K are zeros. `vec` (every row 16-byte aligned): 16-byte cp.async copies,
// `aligned_base` being the (aligned, unread) source of the all-zero ones; else element copies.
// (The fused forward's own load_tile bounds rows by index, not by a null row: not this function.)
template <int ROWS, class Cfg, class RowPtr>
LK_DEVICE void load_tile(uint16_t* tile, RowPtr row_ptr, int64_t k0, const int64_t& K, const bool& vec,
                         const void* aligned_base, int tid) {
  constexpr int BK = Cfg::BK, LDS = Cfg::LDS, NTHREADS = Cfg::NTHREADS;
  if (vec) {
    constexpr int CHUNKS = BK / 8;  // 16-byte chunks per tile row
    for (int c = tid; c < ROWS * CHUNKS; c += NTHREADS) {
      const int r = c / CHUNKS, kc = c % CHUNKS;
      const int64_t gk = k0 + kc * 8;
      const uint16_t* row = row_ptr(r);
      const bool valid = row != nullptr && gk < K;
      const int bytes = valid ? int(2 * (K - gk < 8 ? K - gk : 8)) : 0;
      ptx::cp_async_16(tile + r * LDS + kc * 8, valid ? static_cast<const void*>(row + gk) : aligned_base, bytes);
    }
  } else {
    for (int e = tid; e < ROWS * BK; e += NTHREADS) {
      const int r = e / BK, k = e % BK;
      const int64_t gk = k0 + k;
      const uint16_t* row = row_ptr(r);
      ptx::st_shared_u16(tile + r * LDS + k, row != nullptr && gk < K ? ptx::ld_global_u16(row + gk) : uint16_t(0));
    }
  }
}

// The multistage cp.async K loop over num_k_tiles K slices: load_stage(slot, kt) issues the copies
// of slice kt into buffer `slot`, compute_stage(slot) consumes the buffer. Ends with every copy
// landed (this thread's); the caller adds a barrier where its buffers are reused next.
template <int STAGES, class LoadStage, class ComputeStage>
LK_DEVICE void k_pipeline(int64_t num_k_tiles, LoadStage&& load_stage, ComputeStage&& compute_stage) {
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_k_tiles) load_stage(s, int64_t(s));
    ptx::cp_async_commit();  // one group per stage, empty or not: the wait count stays exact
  }
  for (int64_t kt = 0; kt < num_k_tiles; ++kt) {
    ptx::cp_async_wait<STAGES - 2>();  // K tile kt has landed (this thread's copies) ...
    ptx::cta_sync();                   // ... everyone's, and everyone is done with slot kt - 1
    const int64_t next = kt + STAGES - 1;
    if (next < num_k_tiles) load_stage(int(next % STAGES), next);
    ptx::cp_async_commit();
    compute_stage(int(kt % STAGES));
  }
  ptx::cp_async_wait<0>();
}

// One staged K slice on m16n8k16 tensor cores: acc += x . W^T for this warp's MT x NT tiles, the
// k16 steps of the slice dealt out over the WARPS_K K-splitting warps. After each step's x
// fragments are loaded and used, extra(kk, af) may feed them to another product (the fused
// forward's x . A^T).
template <class Ty, class Cfg, class Extra>
LK_DEVICE void mma_k_slice(const uint16_t* x_tile, const uint16_t* w_tile, int warp_m, int warp_n, int warp_k,
                           int lane, float (&acc)[Cfg::MT][Cfg::NT][4], Extra&& extra) {
  constexpr int MT = Cfg::MT, NT = Cfg::NT, WM = Cfg::WM, WN = Cfg::WN, LDS = Cfg::LDS;
  static_assert(NT % 2 == 0, "W fragments load two n8 tiles at a time");
#pragma unroll
  for (int i = 0; i < Cfg::KSTEPS / Cfg::WARPS_K; ++i) {
    const int kk = (i * Cfg::WARPS_K + warp_k) * 16;
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)  // rows lane%16, k half lane/16 (matrices a0..a3)
      ptx::ldmatrix_x4(af[mt], x_tile + (warp_m * WM + mt * 16 + (lane & 15)) * LDS + kk + (lane >> 4) * 8);
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      // Two n8 tiles per ldmatrix.x4: matrix q = lane/8 is (n8 tile nt + q/2, k half q%2), so
      // registers 0, 1 are b0, b1 of tile nt and registers 2, 3 those of tile nt + 1.
      uint32_t bq[4];
      ptx::ldmatrix_x4(bq, w_tile + (warp_n * WN + nt * 8 + ((lane >> 4) << 3) + (lane & 7)) * LDS + kk +
                               ((lane >> 3) & 1) * 8);
      const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        ptx::mma_m16n8k16<Ty::kBf16>(acc[mt][nt], af[mt], b0);
        ptx::mma_m16n8k16<Ty::kBf16>(acc[mt][nt + 1], af[mt], b1);
      }
    }
    extra(kk, static_cast<const uint32_t(&)[MT][4]>(af));
  }
}

// K-splitting warps (WARPS_K > 1): warps with warp_k > 0 hand their partial sums to warp_k == 0
// through shared memory `red` ([WARPS_K - 1][BM * BN] fp32), in the fragment layout (slot per
// lane), summed in warp_k order. One barrier, which every thread reaches.
template <class Cfg>
LK_DEVICE void reduce_k_split(float* red, int warp_m, int warp_n, int warp_k, int lane,
                              float (&acc)[Cfg::MT][Cfg::NT][4]) {
  constexpr int MT = Cfg::MT, NT = Cfg::NT;
  if constexpr (Cfg::WARPS_K > 1) {
    const int wmn = warp_m * Cfg::WARPS_N + warp_n;
    auto at = [&](int wk, int mt, int nt, int e) {
      return red + ((((wk - 1) * Cfg::WARPS_MN + wmn) * MT * NT + mt * NT + nt) * 4 + e) * 32 + lane;
    };
    if (warp_k > 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) ptx::st_shared_f32(at(warp_k, mt, nt, e), acc[mt][nt][e]);
    }
    ptx::cta_sync();
    if (warp_k == 0) {
      for (int wk = 1; wk < Cfg::WARPS_K; ++wk)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] += ptx::ld_shared_f32(at(wk, mt, nt, e));
    }
  }
}

// acc[mt] += T_mt . B^T over rank columns [0, rank), 8 a step on m16n8k8 tf32 tensor cores, with T
// and B split into tf32 high and low parts: t_lo.b_hi (+ t_hi.b_lo for fp32 B) + t_hi.b_hi, small
// terms first ("tf32x2"; "3xTF32" for fp32 B, fp32-accurate). The warp's tile is WM x WN at
// (warp_m, warp_n) of a tile whose first column is n0; p: the launch parameters (its N and b_fp32
// are read). B element (n, j) is load_b(n, j), read once for all row tiles (only for n < N,
// j < rank; zeros elsewhere). T element (r, j) of tile row r is load_t(r, j); the warp's m16 tiles
// mt with skip_m(mt) are left out.
template <int WM, int WN, class P, int MT, int NT, class LoadB, class SkipM, class LoadT>
LK_DEVICE void add_rank_product(const P& p, float (&acc)[MT][NT][4], const int& rank, int64_t n0, int warp_m,
                                int warp_n, int lane, LoadB&& load_b, SkipM&& skip_m, LoadT&& load_t) {
  const int g = lane >> 2, c = lane & 3;
  const int rank_chunks = (rank + 7) / 8;
  for (int kc = 0; kc < rank_chunks; ++kc) {
    uint32_t bhi[NT][2], blo[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int64_t n = n0 + warp_n * WN + nt * 8 + g;
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // b0: k = c, b1: k = c + 4
        const int j = kc * 8 + c + 4 * h;
        split_tf32(n < p.N && j < rank ? load_b(n, j) : 0.0f, bhi[nt][h], blo[nt][h]);
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (skip_m(mt)) continue;
      const int row0 = warp_m * WM + mt * 16;
      uint32_t ahi[4], alo[4];  // a0 (g, c), a1 (g+8, c), a2 (g, c+4), a3 (g+8, c+4)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        split_tf32(load_t(row0 + g + (e & 1) * 8, kc * 8 + c + (e >> 1) * 4), ahi[e], alo[e]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        ptx::mma_m16n8k8_tf32(acc[mt][nt], alo, bhi[nt]);
        if (p.b_fp32) ptx::mma_m16n8k8_tf32(acc[mt][nt], ahi, blo[nt]);
        ptx::mma_m16n8k8_tf32(acc[mt][nt], ahi, bhi[nt]);
      }
    }
  }
}

// Which BM x BN output tiles of an [M, N] output CTA `pid` computes: row block m_block and the run
// of consecutive column tiles [first_tile, end_tile) (tiles_per_cta of them, fewer at the end).
// Grouped order: group_m row blocks sweep the same column runs together (L2 reuse of W). p: the
// launch parameters (its M, N, tiles_per_cta and group_m are read).
template <int BM, int BN>
struct TileRun {
  int64_t num_n_tiles, m_block, run;

  template <class P>
  LK_DEVICE TileRun(const P& p, int pid) {
    const int64_t num_m_blocks = ceil_div(p.M, BM);
    num_n_tiles = ceil_div(p.N, BN);
    const int64_t num_runs = ceil_div(num_n_tiles, p.tiles_per_cta);
    const int64_t per_group = int64_t(p.group_m) * num_runs;
    const int64_t first_m_block = (pid / per_group) * p.group_m;
    const int64_t rows_in_group = num_m_blocks - first_m_block < p.group_m ? num_m_blocks - first_m_block : p.group_m;
    m_block = first_m_block + (pid % per_group) % rows_in_group;
    run = (pid % per_group) / rows_in_group;
  }
  template <class P>
  LK_DEVICE int64_t first_tile(const P& p) const { return run * p.tiles_per_cta; }
  template <class P>
  LK_DEVICE int64_t end_tile(const P& p) const {
    return first_tile(p) + p.tiles_per_cta < num_n_tiles ? first_tile(p) + p.tiles_per_cta : num_n_tiles;
  }
};

// The epilogue's store of one BN-wide tile of a 16-bit output: y = round(acc + bias[col]), each
// element stored once by the warp_k == 0 thread holding it. p: the launch parameters (its N, bias,
// bias_fp32 and y_pairs are read). The tile's row r is row_base + r (an output row, or a position
// the caller maps); it exists when has_row(row) and starts at y_row(row). Columns col < N; two
// adjacent ones go out as one 32-bit word where p.y_pairs allows.
template <class Ty, class Cfg, class P, class Row, class HasRow, class YRow>
LK_DEVICE void store_tile(const P& p, const float (&acc)[Cfg::MT][Cfg::NT][4], Row row_base, int64_t n0, int warp_m,
                          int warp_n, int lane, HasRow&& has_row, YRow&& y_row) {
  constexpr int MT = Cfg::MT, NT = Cfg::NT, WM = Cfg::WM, WN = Cfg::WN;
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int64_t col = n0 + warp_n * WN + nt * 8 + 2 * c;  // even
    float bias0 = 0.0f, bias1 = 0.0f;
    if (p.bias != nullptr) {
      if (col < p.N) bias0 = load_f32<Ty>(p.bias_fp32, p.bias, col);
      if (col + 1 < p.N) bias1 = load_f32<Ty>(p.bias_fp32, p.bias, col + 1);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // rows g and g + 8
        const Row row = row_base + warp_m * WM + mt * 16 + g + 8 * h;
        if (!has_row(row)) continue;
        const uint16_t v0 = Ty::from_f32(acc[mt][nt][2 * h] + bias0);
        const uint16_t v1 = Ty::from_f32(acc[mt][nt][2 * h + 1] + bias1);
        uint16_t* dst = y_row(row) + col;
        if (p.y_pairs && col + 1 < p.N) {
          ptx::st_global_u32(reinterpret_cast<uint32_t*>(dst), uint32_t(v0) | (uint32_t(v1) << 16));
        } else {
          if (col < p.N) ptx::st_global_u16(dst, v0);
          if (col + 1 < p.N) ptx::st_global_u16(dst + 1, v1);
        }
      }
    }
  }
}

}  // namespace tile
}  // namespace lora_kernels
