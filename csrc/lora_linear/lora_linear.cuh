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

#include "lora_linear/lora_linear_plan.h"
#include "common/tile_common.cuh"  // Fp16 / Bf16 and the tile pieces shared with the multi-adapter kernels

namespace lora_kernels {

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

  const LoraLinearParams& p;
  unsigned char* smem;
  int tid, lane, warp_m, warp_n, warp_k;
  int64_t m0;  // first row of this CTA's row block

  LK_DEVICE LoraLinearCta(const LoraLinearParams& p_, unsigned char* smem_, int tid_)
      : p(p_), smem(smem_), tid(tid_), lane(tid_ % 32), m0(0) {
    tile::warp_coords<Cfg>(tid_ / 32, warp_m, warp_n, warp_k);
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
                           int64_t rows_total, int64_t k0, bool aligned16) const {
    if (aligned16) {
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
    load_tile<BM>(xs(slot), p.x, p.ldx, m0, p.M, k0, p.x_aligned16);
    load_tile<BN>(ws(slot), p.w, p.ldw, n0, p.N, k0, p.w_aligned16);
    if (with_lora) load_tile<RB>(as(slot), p.a, p.lda, 0, p.a_rows, k0, p.a_aligned16);
  }

  // One K slice held in `slot`: acc += x.W^T and (with_lora) tacc += x.A^T for this warp's tiles.
  LK_DEVICE void compute_stage(int slot, bool with_lora, float (&acc)[MT][NT][4],
                               float (&tacc)[MT][TPW][4]) const {
    const uint16_t* a_tile = as(slot);
    tile::mma_k_slice<Ty, Cfg>(xs(slot), ws(slot), warp_m, warp_n, warp_k, lane, acc,
                               [&](int kk, const uint32_t (&af)[MT][4]) {
      if (!with_lora) return;
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
    });
  }

  // The multistage K loop over one output tile (columns [n0, n0 + BN)).
  LK_DEVICE void main_loop(int64_t n0, bool with_lora, float (&acc)[MT][NT][4],
                           float (&tacc)[MT][TPW][4]) const {
    tile::k_pipeline<STAGES>(
        ceil_div(p.K, BK), [&](int slot, int64_t kt) { load_stage(slot, kt, n0, with_lora); },
        [&](int slot) { compute_stage(slot, with_lora, acc, tacc); });
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

  // acc += scale * t[rows, :rank] . B[cols, :rank]^T (tf32 m16n8k8, rank chunks of 8), + bias,
  // rounded to 16 bits and stored once. Called by the warp_k == 0 warps only.
  LK_DEVICE void epilogue(int64_t n0, float (&acc)[MT][NT][4]) const {
    const float* t_s = ts();
    tile::add_rank_product<WM, WN>(
        p, acc, p.rank, n0, warp_m, warp_n, lane,
        [&](int64_t n, int j) { return tile::load_f32<Ty>(p.b_fp32, p.b, n * p.ldb_n + int64_t(j) * p.ldb_r); },
        [](int) { return false; },  // every row tile of the block holds rows of t
        [&](int r, int j) { return p.scale * ptx::ld_shared_f32(t_s + r * L::TPITCH + j); });
    tile::store_tile<Ty, Cfg>(p, acc, m0, n0, warp_m, warp_n, lane, [&](int64_t row) { return row < p.M; },
                              [&](int64_t row) { return p.y + row * p.ldy; });
  }

  LK_DEVICE void run(int pid) {
    const tile::TileRun<BM, BN> tr(p, pid);
    m0 = tr.m_block * BM;
    const int64_t first_tile = tr.first_tile(p), end_tile = tr.end_tile(p), run = tr.run;

    for (int64_t n_tile = first_tile; n_tile < end_tile; ++n_tile) {
      const int64_t n0 = n_tile * BN;
      const bool with_lora = n_tile == first_tile;
      float acc[MT][NT][4];
      float tacc[MT][TPW][4];
      tile::zero(acc);
      tile::zero(tacc);
      main_loop(n0, with_lora, acc, tacc);
      if (with_lora) gather_t(tacc, p.save_t && run == 0);
      tile::reduce_k_split<Cfg>(red(), warp_m, warp_n, warp_k, lane, acc);
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
