// multi_lora_linear on CUDA: the base GEMM over the sorted token order with every token's adapter
// added in the epilogue (torch-free).
//
//   y[tok, n] = sum_k x[tok, k] W[n, k] + bias[n] + sum_{j < rank_i} t[tok, j] B[i, n, j]   (rounded once)
//
// t [M, R] is the segmented shrink's output (csrc/multi_lora.cuh: scaled, fp32). The launcher
// runs that shrink first, so the op is two launches: the shrink (reads x and the active adapters'
// A) and this kernel (reads x and W once, the active adapters' B, writes y once) -- the Triton
// kernel's "t precomputed" path; t is not computed inside this kernel's K loop.
//
// A CTA owns BM consecutive *sorted* positions (tokens grouped by adapter, AdapterIndex) and a run
// of BN-wide output tiles. Its K loop is the single-adapter forward's (lora_linear.cuh): x rows
// (gathered through sorted_tokens) and W stream through a cp.async pipeline into mma.sync. The
// epilogue walks the block's segments (slot_start bounds them): for each, one rank-deep tf32
// product t_seg . B[slot]^T with t split into tf32 high and low parts ("tf32x2"; "3xTF32" for fp32
// B), rows outside the segment zeroed in the fragment; then the bias; then one store per element
// into y's token rows. A prefill block inside a long segment does one such product; a decode
// block one per adapter it holds. No atomics: each element is stored by one thread.
#pragma once

#include <stdint.h>

#include "lora_linear.cuh"  // Fp16 / Bf16, tile configs
#include "multi_lora.cuh"   // load_piece-style helpers: rank_of, split_tf32

namespace lora_kernels {
namespace multi {

template <class Ty, class Cfg>
struct MultiLinearCta {
  using S = MultiLinearSmem<Cfg>;
  static constexpr int STAGES = S::STAGES;
  static constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, LDS = Cfg::LDS;
  static constexpr int MT = Cfg::MT, NT = Cfg::NT, WM = Cfg::WM, WN = Cfg::WN;
  static constexpr int NTHREADS = Cfg::NTHREADS;
  static_assert(NT % 2 == 0, "W fragments load two n8 tiles at a time");

  const MultiLinearParams& p;
  unsigned char* smem;
  int tid, lane, warp_m, warp_n, warp_k;
  int64_t m0 = 0;   // first sorted position of this CTA's row block
  int rows = 0;     // valid rows in the block

  LK_DEVICE MultiLinearCta(const MultiLinearParams& p_, unsigned char* smem_, int tid_)
      : p(p_), smem(smem_), tid(tid_), lane(tid_ % 32) {
    const int warp = tid_ / 32;
    warp_k = warp / Cfg::WARPS_MN;
    warp_m = (warp % Cfg::WARPS_MN) / Cfg::WARPS_N;
    warp_n = warp % Cfg::WARPS_N;
  }

  LK_DEVICE int32_t* tok_s() const { return reinterpret_cast<int32_t*>(smem + S::tok_off); }
  LK_DEVICE uint16_t* xs(int s) const { return reinterpret_cast<uint16_t*>(smem + S::xs_off) + s * BM * LDS; }
  LK_DEVICE uint16_t* ws(int s) const { return reinterpret_cast<uint16_t*>(smem + S::ws_off) + s * BN * LDS; }
  LK_DEVICE float* red() const { return reinterpret_cast<float*>(smem + S::red_off); }
  LK_DEVICE int64_t tok(int r) const { return ptx::ld_shared_s32(tok_s() + r); }

  // Rows [0, ROWS) x columns [k0, k0 + BK) of a 16-bit tile; row r from row_ptr(r) (null = zeros).
  template <int ROWS, class RowPtr>
  LK_DEVICE void load_tile(uint16_t* tile, RowPtr row_ptr, int64_t k0, const void* aligned_base) const {
    if (p.aligned16) {
      constexpr int CHUNKS = BK / 8;
      for (int c = tid; c < ROWS * CHUNKS; c += NTHREADS) {
        const int r = c / CHUNKS, kc = c % CHUNKS;
        const int64_t gk = k0 + kc * 8;
        const uint16_t* row = row_ptr(r);
        const bool valid = row != nullptr && gk < p.K;
        const int bytes = valid ? int(2 * (p.K - gk < 8 ? p.K - gk : 8)) : 0;
        ptx::cp_async_16(tile + r * LDS + kc * 8, valid ? static_cast<const void*>(row + gk) : aligned_base, bytes);
      }
    } else {
      for (int e = tid; e < ROWS * BK; e += NTHREADS) {
        const int r = e / BK, k = e % BK;
        const int64_t gk = k0 + k;
        const uint16_t* row = row_ptr(r);
        ptx::st_shared_u16(tile + r * LDS + k, row != nullptr && gk < p.K ? ptx::ld_global_u16(row + gk) : uint16_t(0));
      }
    }
  }

  LK_DEVICE void load_stage(int s, int64_t kt, int64_t n0) const {
    const int64_t k0 = kt * BK;
    load_tile<BM>(xs(s), [&](int r) { return r < rows ? p.x + tok(r) * p.ldx : static_cast<const uint16_t*>(nullptr); },
                  k0, p.x);
    load_tile<BN>(ws(s), [&](int r) { return n0 + r < p.N ? p.w + (n0 + r) * p.ldw : static_cast<const uint16_t*>(nullptr); },
                  k0, p.w);
  }

  LK_DEVICE void compute_stage(int s, float (&acc)[MT][NT][4]) const {
    const uint16_t* x_tile = xs(s);
    const uint16_t* w_tile = ws(s);
#pragma unroll
    for (int i = 0; i < Cfg::KSTEPS / Cfg::WARPS_K; ++i) {
      const int kk = (i * Cfg::WARPS_K + warp_k) * 16;
      uint32_t af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ptx::ldmatrix_x4(af[mt], x_tile + (warp_m * WM + mt * 16 + (lane & 15)) * LDS + kk + (lane >> 4) * 8);
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        uint32_t bq[4];  // matrix q = lane/8: (n8 tile nt + q/2, k half q%2), as lora_linear.cuh
        ptx::ldmatrix_x4(bq, w_tile + (warp_n * WN + nt * 8 + ((lane >> 4) << 3) + (lane & 7)) * LDS + kk +
                                 ((lane >> 3) & 1) * 8);
        const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          ptx::mma_m16n8k16<Ty::kBf16>(acc[mt][nt], af[mt], b0);
          ptx::mma_m16n8k16<Ty::kBf16>(acc[mt][nt + 1], af[mt], b1);
        }
      }
    }
  }

  LK_DEVICE void main_loop(int64_t n0, float (&acc)[MT][NT][4]) const {
    const int64_t num_k_tiles = ceil_div(p.K, BK);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < num_k_tiles) load_stage(s, s, n0);
      ptx::cp_async_commit();
    }
    for (int64_t kt = 0; kt < num_k_tiles; ++kt) {
      ptx::cp_async_wait<STAGES - 2>();
      ptx::cta_sync();
      const int64_t next = kt + STAGES - 1;
      if (next < num_k_tiles) load_stage(int(next % STAGES), next, n0);
      ptx::cp_async_commit();
      compute_stage(int(kt % STAGES), acc);
    }
    ptx::cp_async_wait<0>();
    ptx::cta_sync();  // pipeline buffers free again
  }

  // K-splitting warps (SmallTile) hand their sums to warp_k == 0, summed in warp_k order.
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

  LK_DEVICE float load_b(int slot, int64_t n, int j) const {
    const int64_t off = int64_t(slot) * p.ldb_l + n * p.ldb_n + int64_t(j) * p.ldb_r;
    return p.b_fp32 ? ptx::ld_global_f32(static_cast<const float*>(p.b) + off)
                    : Ty::to_f32(ptx::ld_global_u16(static_cast<const uint16_t*>(p.b) + off));
  }

  LK_DEVICE float load_bias(int64_t n) const {
    return p.bias_fp32 ? ptx::ld_global_f32(static_cast<const float*>(p.bias) + n)
                       : Ty::to_f32(ptx::ld_global_u16(static_cast<const uint16_t*>(p.bias) + n));
  }

  // acc += t[rows lo..hi) . B[slot, cols, :rank]^T for one segment (tile rows [lo, hi)).
  LK_DEVICE void add_segment(int64_t n0, int slot, int rank, int lo, int hi, float (&acc)[MT][NT][4]) const {
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
          split_tf32(n < p.N && j < rank ? load_b(slot, n, j) : 0.0f, bhi[nt][h], blo[nt][h]);
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row0 = warp_m * WM + mt * 16;
        if (row0 + 16 <= lo || row0 >= hi) continue;  // this m16 tile holds none of the segment
        uint32_t ahi[4], alo[4];  // a0 (g, c), a1 (g+8, c), a2 (g, c+4), a3 (g+8, c+4)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = row0 + g + (e & 1) * 8, j = kc * 8 + c + (e >> 1) * 4;
          const float v = r >= lo && r < hi && j < rank ? ptx::ld_global_f32(p.t + tok(r) * p.ldt_m + int64_t(j) * p.ldt_r)
                                                        : 0.0f;
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
  }

  // The block's segments (sorted positions [m0, m0 + rows) grouped by slot), then bias, one store.
  LK_DEVICE void epilogue(int64_t n0, float (&acc)[MT][NT][4]) const {
    for (int lo = 0; lo < rows;) {
      const int slot = ptx::ld_global_s32(p.sorted_adapter + m0 + lo);
      const int group = slot >= 0 && slot < p.L ? slot : p.L;
      int64_t end = int64_t(ptx::ld_global_s32(p.slot_start + group + 1)) - m0;
      const int hi = end <= lo ? lo + 1 : (end > rows ? rows : int(end));  // always progresses
      const int rank = slot < p.L ? rank_of(p.ranks, slot, p.R) : 0;
      if (rank > 0) add_segment(n0, slot, rank, lo, hi, acc);
      lo = hi;
    }
    const int g = lane >> 2, c = lane & 3;
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
          const int r = warp_m * WM + mt * 16 + g + 8 * h;
          if (r >= rows) continue;
          const uint16_t v0 = Ty::from_f32(acc[mt][nt][2 * h] + bias0);
          const uint16_t v1 = Ty::from_f32(acc[mt][nt][2 * h + 1] + bias1);
          uint16_t* dst = p.y + tok(r) * p.ldy + col;
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
    // Grouped order: group_m row blocks sweep the same column runs together (L2 reuse of W).
    const int64_t per_group = int64_t(p.group_m) * num_runs;
    const int64_t first_m_block = (pid / per_group) * p.group_m;
    const int64_t rows_in_group = num_m_blocks - first_m_block < p.group_m ? num_m_blocks - first_m_block : p.group_m;
    const int64_t m_block = first_m_block + (pid % per_group) % rows_in_group;
    const int64_t run = (pid % per_group) / rows_in_group;
    m0 = m_block * BM;
    rows = int(p.M - m0 < BM ? p.M - m0 : BM);
    for (int r = tid; r < rows; r += NTHREADS) ptx::st_shared_s32(tok_s() + r, ptx::ld_global_s32(p.sorted_tokens + m0 + r));
    ptx::cta_sync();
    const int64_t first_tile = run * p.tiles_per_cta;
    const int64_t end_tile = first_tile + p.tiles_per_cta < num_n_tiles ? first_tile + p.tiles_per_cta : num_n_tiles;
    for (int64_t tile = first_tile; tile < end_tile; ++tile) {
      const int64_t n0 = tile * BN;
      float acc[MT][NT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
      main_loop(n0, acc);
      reduce_acc(acc);
      if (warp_k == 0) epilogue(n0, acc);
      ptx::cta_sync();  // red is rewritten by the next tile's reduction
    }
  }
};

}  // namespace multi

template <class Ty, class Cfg>
LK_DEVICE void multi_linear_cta(const MultiLinearParams& p, unsigned char* smem, int pid, int tid) {
  multi::MultiLinearCta<Ty, Cfg> cta(p, smem, tid);
  cta.run(pid);
}

#if defined(__CUDACC__) && !defined(LORA_KERNELS_HOST_EMULATION)
template <class Ty, class Cfg>
__global__ void __launch_bounds__(Cfg::NTHREADS) multi_linear_kernel(const MultiLinearParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  multi_linear_cta<Ty, Cfg>(p, smem, int(blockIdx.x), int(threadIdx.x));
}
#endif

}  // namespace lora_kernels
