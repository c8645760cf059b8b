// multi_lora_linear on CUDA: the base GEMM over the sorted token order with every token's adapter
// added in the epilogue (torch-free).
//
//   y[tok, n] = sum_k x[tok, k] W[n, k] + bias[n] + sum_{j < rank_i} t[tok, j] B[i, n, j]   (rounded once)
//
// t [M, R] is the segmented shrink's output (csrc/multi_lora/multi_lora.cuh: scaled, fp32). The launcher
// runs that shrink first, so the op is two launches: the shrink (reads x and the active adapters'
// A) and this kernel (reads x and W once, the active adapters' B, writes y once) -- the Triton
// kernel's "t precomputed" path; t is not computed inside this kernel's K loop.
//
// A CTA owns BM consecutive *sorted* positions (tokens grouped by adapter, AdapterIndex) and a run
// of BN-wide output tiles. Its K loop is the single-adapter forward's (tile_common.cuh, shared
// with lora_linear.cuh): x rows (gathered through sorted_tokens) and W stream through a cp.async
// pipeline into mma.sync. The epilogue walks the block's segments (slot_start bounds them): for
// each, one rank-deep tf32 product t_seg . B[slot]^T with t split into tf32 high and low parts
// ("tf32x2"; "3xTF32" for fp32 B), rows outside the segment zeroed in the fragment; then the bias;
// then one store per element into y's token rows. A prefill block inside a long segment does one
// such product; a decode block one per adapter it holds. No atomics: each element is stored by one
// thread.
#pragma once

#include <stdint.h>

#include "multi_lora/multi_lora.cuh"   // rank_of
#include "common/tile_common.cuh"  // Fp16 / Bf16 and the tile pieces shared with the fused forward

namespace lora_kernels {
namespace multi {

template <class Ty, class Cfg>
struct MultiLinearCta {
  using S = MultiLinearSmem<Cfg>;
  static constexpr int STAGES = S::STAGES;
  static constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, LDS = Cfg::LDS;
  static constexpr int MT = Cfg::MT, NT = Cfg::NT, WM = Cfg::WM, WN = Cfg::WN;
  static constexpr int NTHREADS = Cfg::NTHREADS;

  const MultiLinearParams& p;
  unsigned char* smem;
  int tid, lane, warp_m, warp_n, warp_k;
  int64_t m0 = 0;   // first sorted position of this CTA's row block
  int rows = 0;     // valid rows in the block

  LK_DEVICE MultiLinearCta(const MultiLinearParams& p_, unsigned char* smem_, int tid_)
      : p(p_), smem(smem_), tid(tid_), lane(tid_ % 32) {
    tile::warp_coords<Cfg>(tid_ / 32, warp_m, warp_n, warp_k);
  }

  LK_DEVICE int32_t* tok_s() const { return reinterpret_cast<int32_t*>(smem + S::tok_off); }
  LK_DEVICE uint16_t* xs(int s) const { return reinterpret_cast<uint16_t*>(smem + S::xs_off) + s * BM * LDS; }
  LK_DEVICE uint16_t* ws(int s) const { return reinterpret_cast<uint16_t*>(smem + S::ws_off) + s * BN * LDS; }
  LK_DEVICE float* red() const { return reinterpret_cast<float*>(smem + S::red_off); }
  LK_DEVICE int64_t tok(int r) const { return ptx::ld_shared_s32(tok_s() + r); }

  LK_DEVICE void load_stage(int s, int64_t kt, int64_t n0) const {
    const int64_t k0 = kt * BK;
    tile::load_tile<BM, Cfg>(
        xs(s), [&](int r) { return r < rows ? p.x + tok(r) * p.ldx : static_cast<const uint16_t*>(nullptr); }, k0, p.K,
        p.aligned16, p.x, tid);
    tile::load_tile<BN, Cfg>(
        ws(s), [&](int r) { return n0 + r < p.N ? p.w + (n0 + r) * p.ldw : static_cast<const uint16_t*>(nullptr); }, k0,
        p.K, p.aligned16, p.w, tid);
  }

  LK_DEVICE void main_loop(int64_t n0, float (&acc)[MT][NT][4]) const {
    tile::k_pipeline<STAGES>(
        ceil_div(p.K, BK), [&](int s, int64_t kt) { load_stage(s, kt, n0); },
        [&](int s) {
          tile::mma_k_slice<Ty, Cfg>(xs(s), ws(s), warp_m, warp_n, warp_k, lane, acc,
                                     [](int, const uint32_t (&)[MT][4]) {});
        });
    ptx::cta_sync();  // pipeline buffers free again
  }

  // acc += t[rows lo..hi) . B[slot, cols, :rank]^T for one segment (tile rows [lo, hi)).
  LK_DEVICE void add_segment(int64_t n0, int slot, int rank, int lo, int hi, float (&acc)[MT][NT][4]) const {
    tile::add_rank_product<WM, WN>(
        p, acc, rank, n0, warp_m, warp_n, lane,
        [&](int64_t n, int j) {
          const int64_t off = int64_t(slot) * p.ldb_l + n * p.ldb_n + int64_t(j) * p.ldb_r;
          return tile::load_f32<Ty>(p.b_fp32, p.b, off);
        },
        [&](int mt) {  // this m16 tile holds none of the segment
          const int row0 = warp_m * WM + mt * 16;
          return row0 + 16 <= lo || row0 >= hi;
        },
        [&](int r, int j) {
          return r >= lo && r < hi && j < rank ? ptx::ld_global_f32(p.t + tok(r) * p.ldt_m + int64_t(j) * p.ldt_r)
                                               : 0.0f;
        });
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
    tile::store_tile<Ty, Cfg>(p, acc, 0, n0, warp_m, warp_n, lane, [&](int r) { return r < rows; },
                              [&](int r) { return p.y + tok(r) * p.ldy; });
  }

  LK_DEVICE void run(int pid) {
    const tile::TileRun<BM, BN> tr(p, pid);
    m0 = tr.m_block * BM;
    rows = int(p.M - m0 < BM ? p.M - m0 : BM);
    for (int r = tid; r < rows; r += NTHREADS) ptx::st_shared_s32(tok_s() + r, ptx::ld_global_s32(p.sorted_tokens + m0 + r));
    ptx::cta_sync();
    const int64_t first_tile = tr.first_tile(p), end_tile = tr.end_tile(p);
    for (int64_t n_tile = first_tile; n_tile < end_tile; ++n_tile) {
      const int64_t n0 = n_tile * BN;
      float acc[MT][NT][4];
      tile::zero(acc);
      main_loop(n0, acc);
      tile::reduce_k_split<Cfg>(red(), warp_m, warp_n, warp_k, lane, acc);
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
