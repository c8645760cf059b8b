// Fused LoRA linear forward on tensor cores (torch-free).
//
//   y[m, n] = sum_k x[m, k] W[n, k] + scale * sum_j t[m, j] B[n, j] + bias[n]     (rounded once)
//   t[m, j] = sum_k x[m, k] A[j, k]                                             (fp32, on chip)
//
// One CTA owns a block of BM rows of x and a run of `tiles_per_cta` consecutive BN-wide output
// tiles. For the run's first tile the K loop streams x, W and A through a cp.async pipeline into
// shared memory and feeds every x fragment to two tensor-core products (x.W^T into the tile
// accumulator, x.A^T into t); t then lives in shared memory in fp32 for the run's remaining
// tiles, whose K loops compute only x.W^T. The epilogue of every tile adds scale * t.B^T on
// tensor cores (tf32, t and fp32 B split into high and low tf32 parts: "3xTF32", fp32-accurate),
// then the bias, and stores y once. t is written to global memory (for the backward pass) by
// the CTA whose run starts at column 0.
//
// Shapes and layouts (the launcher guarantees them): x [M, K], W [N, K], A [a_rows, K] 16-bit with
// unit stride along K and any row stride; B [N, rank] 16-bit or fp32, any strides; bias [N]
// contiguous, 16-bit or fp32; y [M, N] with unit column stride; t [M, rank] fp32 with unit column
// stride. fp32 adapters arrive split: A is then [2*rank, K] = (A_hi; A_lo) in 16-bit, so that
// x.A^T is two exact 16-bit products whose halves are summed in fp32 (a_split).
//
// Out-of-range rows/columns (M, N, K, rank tails) are zero-filled in shared memory and never
// stored; every global access is guarded. Two tile shapes: SmallTile for decode-sized M (one
// 16-row block, the K slice split across 4 warps) and LargeTile for prefill/training M.
#pragma once

#include <stdint.h>

#include "lora_linear_plan.h"
#ifndef LORA_KERNELS_HOST_EMULATION
#include "ptx.cuh"
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

// ------------------------------------------------------------------------------------------------
// The CTA body. `pid` = blockIdx.x, `tid` = threadIdx.x, `smem` = dynamic shared memory.
// ------------------------------------------------------------------------------------------------
template <class Ty, class Cfg, int RB>
struct LoraLinearCta {
  using L = SmemLayout<Cfg, RB>;
  static constexpr int STAGES = L::STAGES;
  static constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, LDS = Cfg::LDS;
  static constexpr int MT = Cfg::MT, NT = Cfg::NT, WM = Cfg::WM, WN = Cfg::WN;
  static constexpr int NTHREADS = Cfg::NTHREADS;
  static constexpr int RTILES = RB / 8;                                       // n8 tiles of t
  static constexpr int TPW = (RTILES + Cfg::WARPS_N - 1) / Cfg::WARPS_N;      // t tiles per warp
  static_assert(RB % 16 == 0 && RB <= 128, "rank block");
  static_assert(NT % 2 == 0, "W fragments load two n8 tiles at a time");

  const LoraLinearParams& p;
  unsigned char* smem;
  int tid, lane, warp_m, warp_n, warp_k;
  int64_t m0;  // first row of this CTA's row block

  LK_DEVICE LoraLinearCta(const LoraLinearParams& p_, unsigned char* smem_, int tid_)
      : p(p_), smem(smem_), tid(tid_), lane(tid_ % 32), m0(0) {
    const int warp = tid_ / 32;
    warp_k = warp / Cfg::WARPS_MN;
    warp_m = (warp % Cfg::WARPS_MN) / Cfg::WARPS_N;
    warp_n = warp % Cfg::WARPS_N;
  }

  LK_DEVICE uint16_t* xs(int slot) const { return reinterpret_cast<uint16_t*>(smem + L::xs_off) + slot * BM * LDS; }
  LK_DEVICE uint16_t* ws(int slot) const { return reinterpret_cast<uint16_t*>(smem + L::ws_off) + slot * BN * LDS; }
  LK_DEVICE uint16_t* as(int slot) const { return reinterpret_cast<uint16_t*>(smem + L::as_off) + slot * RB * LDS; }
  LK_DEVICE float* ts() const { return reinterpret_cast<float*>(smem + L::ts_off); }
  LK_DEVICE float* red() const { return reinterpret_cast<float*>(smem + L::red_off); }

  // Rows [row0, row0 + ROWS) x columns [k0, k0 + BK) of a [rows_total, K] 16-bit matrix with row
  // stride ld into a [ROWS][LDS] shared tile; zeros outside the matrix.
  template <int ROWS>
  LK_DEVICE void load_tile(uint16_t* tile, const uint16_t* g, int64_t ld, int64_t row0,
                           int64_t rows_total, int64_t k0) const {
    if (p.aligned16) {
      constexpr int CHUNKS = BK / 8;  // 16-byte chunks per tile row
      for (int c = tid; c < ROWS * CHUNKS; c += NTHREADS) {
        const int r = c / CHUNKS, kc = c % CHUNKS;
        const int64_t grow = row0 + r, gk = k0 + kc * 8;
        const bool valid = grow < rows_total && gk < p.K;
        const int bytes = valid ? int(2 * (p.K - gk < 8 ? p.K - gk : 8)) : 0;
        const uint16_t* src = valid ? g + grow * ld + gk : g;  // not read when bytes == 0
        ptx::cp_async_16(tile + r * LDS + kc * 8, src, bytes);
      }
    } else {
      for (int e = tid; e < ROWS * BK; e += NTHREADS) {
        const int r = e / BK, k = e % BK;
        const int64_t grow = row0 + r, gk = k0 + k;
        const uint16_t v = (grow < rows_total && gk < p.K) ? ptx::ld_global_u16(g + grow * ld + gk) : uint16_t(0);
        ptx::st_shared_u16(tile + r * LDS + k, v);
      }
    }
  }

  LK_DEVICE void load_stage(int slot, int64_t kt, int64_t n0, bool with_lora) const {
    const int64_t k0 = kt * BK;
    load_tile<BM>(xs(slot), p.x, p.ldx, m0, p.M, k0);
    load_tile<BN>(ws(slot), p.w, p.ldw, n0, p.N, k0);
    if (with_lora) load_tile<RB>(as(slot), p.a, p.lda, 0, p.a_rows, k0);
  }

  // One K slice held in `slot`: acc += x.W^T and (with_lora) tacc += x.A^T for this warp's tiles.
  LK_DEVICE void compute_stage(int slot, bool with_lora, float (&acc)[MT][NT][4],
                               float (&tacc)[MT][TPW][4]) const {
    const uint16_t* x_tile = xs(slot);
    const uint16_t* w_tile = ws(slot);
    const uint16_t* a_tile = as(slot);
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
      if (with_lora) {
#pragma unroll
        for (int tp = 0; tp < TPW; ++tp) {
          const int j = warp_n + tp * Cfg::WARPS_N;  // t tile j covers rank columns [8j, 8j + 8)
          if (j < RTILES) {
            uint32_t bf[2];
            ptx::ldmatrix_x2(bf, a_tile + (j * 8 + (lane & 7)) * LDS + kk + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ptx::mma_m16n8k16<Ty::kBf16>(tacc[mt][tp], af[mt], bf);
          }
        }
      }
    }
  }

  // The multistage K loop over one output tile (columns [n0, n0 + BN)).
  LK_DEVICE void main_loop(int64_t n0, bool with_lora, float (&acc)[MT][NT][4],
                           float (&tacc)[MT][TPW][4]) const {
    const int64_t num_k_tiles = ceil_div(p.K, BK);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < num_k_tiles) load_stage(s, s, n0, with_lora);
      ptx::cp_async_commit();  // one group per stage, empty or not: the wait count stays exact
    }
    for (int64_t kt = 0; kt < num_k_tiles; ++kt) {
      ptx::cp_async_wait<STAGES - 2>();  // K tile kt has landed (this thread's copies) ...
      ptx::cta_sync();                   // ... everyone's, and everyone is done with slot kt-1
      const int64_t next = kt + STAGES - 1;
      if (next < num_k_tiles) load_stage(int(next % STAGES), next, n0, with_lora);
      ptx::cp_async_commit();
      compute_stage(int(kt % STAGES), with_lora, acc, tacc);
    }
    ptx::cp_async_wait<0>();
    ptx::cta_sync();  // pipeline buffers free again
  }

  // After the first tile's K loop: t (summed over the K-splitting warps, and over the hi/lo
  // halves of a split adapter) into ts, and to global memory when this CTA writes it.
  LK_DEVICE void gather_t(const float (&tacc)[MT][TPW][4], bool write_global) const {
    float* t_s = ts();
    const int g = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
    for (int phase = 0; phase < Cfg::WARPS_K; ++phase) {
      if (warp_k == phase) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int tp = 0; tp < TPW; ++tp) {
            const int j = warp_n + tp * Cfg::WARPS_N;
            if (j >= RTILES) continue;
            const int row = warp_m * WM + mt * 16 + g, col = j * 8 + c2;
#pragma unroll
            for (int e = 0; e < 4; ++e) {  // D fragment: (g, c2), (g, c2+1), (g+8, c2), (g+8, c2+1)
              float* dst = t_s + (row + (e >> 1) * 8) * L::TPITCH + col + (e & 1);
              const float v = phase == 0 ? tacc[mt][tp][e] : ptx::ld_shared_f32(dst) + tacc[mt][tp][e];
              ptx::st_shared_f32(dst, v);
            }
          }
      }
      ptx::cta_sync();
    }
    if (p.a_split) {  // t[:, j] += t'[:, rank + j]; each (row, j) belongs to one thread
      for (int e = tid; e < BM * p.rank; e += NTHREADS) {
        const int row = e / p.rank, j = e % p.rank;
        float* dst = t_s + row * L::TPITCH + j;
        ptx::st_shared_f32(dst, ptx::ld_shared_f32(dst) + ptx::ld_shared_f32(dst + p.rank));
      }
      ptx::cta_sync();
    }
    if (write_global) {
      for (int e = tid; e < BM * p.rank; e += NTHREADS) {
        const int row = e / p.rank, j = e % p.rank;
        if (m0 + row < p.M) ptx::st_global_f32(p.t + (m0 + row) * p.ldt + j, ptx::ld_shared_f32(t_s + row * L::TPITCH + j));
      }
    }
  }

  // K-splitting warps (WARPS_K > 1): warps with warp_k > 0 hand their partial sums to warp_k == 0
  // through shared memory, in the fragment layout (slot per lane), summed in warp_k order.
  LK_DEVICE void reduce_acc(float (&acc)[MT][NT][4]) const {
    if constexpr (Cfg::WARPS_K > 1) {
      float* r = red();
      const int wmn = warp_m * Cfg::WARPS_N + warp_n;
      auto at = [&](int wk, int mt, int nt, int e) {
        return r + ((((wk - 1) * Cfg::WARPS_MN + wmn) * MT * NT + mt * NT + nt) * 4 + e) * 32 + lane;
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

  LK_DEVICE float load_b(int64_t n, int j) const {
    const int64_t off = n * p.ldb_n + int64_t(j) * p.ldb_r;
    return p.b_fp32 ? ptx::ld_global_f32(static_cast<const float*>(p.b) + off)
                    : Ty::to_f32(ptx::ld_global_u16(static_cast<const uint16_t*>(p.b) + off));
  }

  LK_DEVICE float load_bias(int64_t n) const {
    return p.bias_fp32 ? ptx::ld_global_f32(static_cast<const float*>(p.bias) + n)
                       : Ty::to_f32(ptx::ld_global_u16(static_cast<const uint16_t*>(p.bias) + n));
  }

  LK_DEVICE static void split_tf32(float v, uint32_t& hi, uint32_t& lo) {
    hi = ptx::f32_to_tf32(v);
    lo = ptx::f32_to_tf32(v - ptx::tf32_to_f32(hi));
  }

  // acc += scale * t[rows, :rank] . B[cols, :rank]^T (tf32 m16n8k8, rank chunks of 8), + bias,
  // rounded to 16 bits and stored once. Called by the warp_k == 0 warps only.
  LK_DEVICE void epilogue(int64_t n0, float (&acc)[MT][NT][4]) const {
    const float* t_s = ts();
    const int g = lane >> 2, c = lane & 3;
    const int rank_chunks = (p.rank + 7) / 8;
    for (int kc = 0; kc < rank_chunks; ++kc) {
      uint32_t bhi[NT][2], blo[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int64_t n = n0 + warp_n * WN + nt * 8 + g;
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // b0: k = c, b1: k = c + 4
          const int j = kc * 8 + c + 4 * h;
          split_tf32((n < p.N && j < p.rank) ? load_b(n, j) : 0.0f, bhi[nt][h], blo[nt][h]);
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = warp_m * WM + mt * 16 + g;
        uint32_t ahi[4], alo[4];  // a0 (g, c), a1 (g+8, c), a2 (g, c+4), a3 (g+8, c+4)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float v = p.scale * ptx::ld_shared_f32(t_s + (row + (e & 1) * 8) * L::TPITCH + kc * 8 + c + (e >> 1) * 4);
          split_tf32(v, ahi[e], alo[e]);
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          ptx::mma_m16n8k8_tf32(acc[mt][nt], alo, bhi[nt]);
          if (p.b_fp32) ptx::mma_m16n8k8_tf32(acc[mt][nt], ahi, blo[nt]);
          ptx::mma_m16n8k8_tf32(acc[mt][nt], ahi, bhi[nt]);
        }
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int64_t col = n0 + warp_n * WN + nt * 8 + 2 * c;  // even
      float bias0 = 0.0f, bias1 = 0.0f;
      if (p.bias != nullptr) {
        if (col < p.N) bias0 = load_bias(col);
        if (col + 1 < p.N) bias1 = load_bias(col + 1);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // rows g and g + 8
          const int64_t row = m0 + warp_m * WM + mt * 16 + g + 8 * h;
          if (row >= p.M) continue;
          const uint16_t v0 = Ty::from_f32(acc[mt][nt][2 * h] + bias0);
          const uint16_t v1 = Ty::from_f32(acc[mt][nt][2 * h + 1] + bias1);
          uint16_t* dst = p.y + row * p.ldy + col;
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

  LK_DEVICE void run(int pid) {
    const int64_t num_m_blocks = ceil_div(p.M, BM);
    const int64_t num_n_tiles = ceil_div(p.N, BN);
    const int64_t num_runs = ceil_div(num_n_tiles, p.tiles_per_cta);
    // Grouped order: group_m row blocks sweep the same column runs together.
    const int64_t per_group = int64_t(p.group_m) * num_runs;
    const int64_t first_m_block = (pid / per_group) * p.group_m;
    const int64_t rows_in_group = num_m_blocks - first_m_block < p.group_m ? num_m_blocks - first_m_block : p.group_m;
    const int64_t m_block = first_m_block + (pid % per_group) % rows_in_group;
    const int64_t run = (pid % per_group) / rows_in_group;
    m0 = m_block * BM;
    const int64_t first_tile = run * p.tiles_per_cta;
    const int64_t end_tile = first_tile + p.tiles_per_cta < num_n_tiles ? first_tile + p.tiles_per_cta : num_n_tiles;

    for (int64_t tile = first_tile; tile < end_tile; ++tile) {
      const int64_t n0 = tile * BN;
      const bool with_lora = tile == first_tile;
      float acc[MT][NT][4];
      float tacc[MT][TPW][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
#pragma unroll
        for (int tp = 0; tp < TPW; ++tp)
#pragma unroll
          for (int e = 0; e < 4; ++e) tacc[mt][tp][e] = 0.0f;
      }
      main_loop(n0, with_lora, acc, tacc);
      if (with_lora) gather_t(tacc, p.save_t && run == 0);
      reduce_acc(acc);
      if (warp_k == 0) epilogue(n0, acc);
      // Not required today (main_loop ends with a barrier and the epilogue reads no pipeline
      // buffer; red is rewritten only after the next K loop's barriers); kept so that an epilogue
      // that stages through shared memory stays safe. One barrier per tile.
      ptx::cta_sync();
    }
  }
};

template <class Ty, class Cfg, int RB>
LK_DEVICE void lora_linear_cta(const LoraLinearParams& p, unsigned char* smem, int pid, int tid) {
  LoraLinearCta<Ty, Cfg, RB> cta(p, smem, tid);
  cta.run(pid);
}

#if defined(__CUDACC__) && !defined(LORA_KERNELS_HOST_EMULATION)
template <class Ty, class Cfg, int RB>
__global__ void __launch_bounds__(Cfg::NTHREADS) lora_linear_fwd_kernel(const LoraLinearParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  lora_linear_cta<Ty, Cfg, RB>(p, smem, int(blockIdx.x), int(threadIdx.x));
}
#endif

}  // namespace lora_kernels
