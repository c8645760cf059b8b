// Launch parameters, tile shapes, shared-memory layout and launch planning of the fused LoRA
// linear forward: plain C++17 (no CUDA, no torch), shared by the kernel (lora_linear.cuh), the
// CUDA launcher (lora_linear_kernels.cu), the torch-facing launcher (lora_linear.cpp) and the
// host emulator (tests/cuda_emulation/).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#include "common/plan_common.h"  // LK_HOST_DEVICE, ceil_div, alignment predicates

namespace lora_kernels {

// ------------------------------------------------------------------------------------------------
// Parameters of one launch (plain data: the kernel argument).
// ------------------------------------------------------------------------------------------------
struct LoraLinearParams {
  const uint16_t* x;   // [M, K], 16-bit
  const uint16_t* w;   // [N, K], 16-bit
  const uint16_t* a;   // [a_rows, K], 16-bit
  const void* b;       // [N, rank], 16-bit or fp32 (b_fp32)
  const void* bias;    // [N] contiguous, 16-bit or fp32 (bias_fp32), or null
  uint16_t* y;         // [M, N]
  float* t;            // [M, rank] fp32, written when save_t
  int64_t M, N, K;
  int rank;            // r
  int a_rows;          // rank, or 2 * rank when a_split
  int64_t ldx, ldw, lda;    // row strides in elements (unit stride along K)
  int64_t ldb_n, ldb_r;     // B strides in elements
  int64_t ldy, ldt;         // row strides in elements (unit column stride)
  float scale;
  bool a_split;        // A = (A_hi; A_lo) of an fp32 adapter: t[:, j] = t'[:, j] + t'[:, rank + j]
  bool b_fp32;
  bool bias_fp32;
  bool save_t;
  // Per operand (x, W, A): base pointer 16-byte aligned and row stride a multiple of 8, so its
  // rows load as 16-byte cp.async chunks; else 2-byte loads -- for that operand only (an offset
  // view of x no longer sends W, the largest operand, to scalar copies).
  bool x_aligned16, w_aligned16, a_aligned16;
  bool y_pairs;        // y: base 4-byte aligned and ldy even, so two adjacent outputs store as one word
  int tiles_per_cta;   // consecutive BN tiles per CTA (t is computed once per CTA)
  int group_m;         // row blocks that sweep the same column runs together (L2 reuse of W)
};

// ------------------------------------------------------------------------------------------------
// Tile shapes. The numbers are design reasoning about A100/H100 (no GPU was available when they
// were chosen; bench/ is where they get measured):
//  * LargeTile 128x128x32, 8 warps as 2 (M) x 4 (N), warp tile 64x32: the usual mma.sync GEMM tile
//    (64 fp32 accumulators per thread leaves room for t's fragments at rank 128), 4 stages of
//    cp.async (3 at rank 128, to stay under A100's 163 KB of shared memory).
//  * SmallTile 16x32x64, 4 warps splitting each 64-deep K slice (one k16 step each) and summing
//    through shared memory: decode is a stream over W, so the tile is narrow (N/32 CTAs keep the
//    SMs busy at N = 4096) and up to 6 stages keep enough bytes of W in flight.
// ------------------------------------------------------------------------------------------------
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int WARPS_K_, int MAX_STAGES_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, WARPS_K = WARPS_K_;
  static constexpr int MAX_STAGES = MAX_STAGES_;
  static constexpr int WARPS_MN = WARPS_M * WARPS_N;
  static constexpr int NTHREADS = 32 * WARPS_MN * WARPS_K;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int MT = WM / 16, NT = WN / 8;              // m16 x n8 MMA tiles per warp
  static constexpr int KSTEPS = BK / 16;                       // k16 steps per K slice
  // Shared-memory row pitch of a [rows][BK] 16-bit tile: 8 extra elements (16 bytes) make the
  // 8 row addresses of one ldmatrix phase fall in distinct bank groups (pitch = 4 mod 8 words).
  static constexpr int LDS = BK + 8;
  static_assert(BM % (16 * WARPS_M) == 0 && BN % (8 * WARPS_N) == 0, "warp tile");
  static_assert(BK % 16 == 0 && KSTEPS % WARPS_K == 0, "K slice split across warps");
  static_assert(((LDS / 2) % 8) == 4, "ldmatrix bank-conflict-free pitch");
};

using LargeTile = TileConfig<128, 128, 32, 2, 4, 1, 4>;
using SmallTile = TileConfig<16, 32, 64, 1, 1, 4, 6>;

enum TileKind : int { kTileAuto = 0, kTileSmall = 1, kTileLarge = 2 };

// Shared-memory budget per CTA: A100's opt-in maximum is 163 KB; stay under it on every target.
constexpr size_t kSmemBudget = 160 * 1024;

// Shared memory of one CTA, in bytes, laid out as
//   xs [STAGES][BM][LDS] u16 | ws [STAGES][BN][LDS] u16 | as [STAGES][RB][LDS] u16 |
//   ts [BM][RB + 4] f32 | red [WARPS_K - 1][BM * BN] f32
template <class Cfg, int RB>
struct SmemLayout {
  static constexpr int TPITCH = RB + 4;  // fp32 t rows: conflict-free fragment reads (4 mod 32 words)
  static constexpr size_t stage_bytes = size_t(Cfg::BM + Cfg::BN + RB) * Cfg::LDS * 2;
  static constexpr size_t fixed_bytes = size_t(Cfg::BM) * TPITCH * 4 +
                                        size_t(Cfg::WARPS_K - 1) * Cfg::BM * Cfg::BN * 4;
  static constexpr int stages_that_fit() {
    int s = Cfg::MAX_STAGES;
    while (s > 2 && fixed_bytes + s * stage_bytes > kSmemBudget) --s;
    return s;
  }
  static constexpr int STAGES = stages_that_fit();
  static constexpr size_t xs_off = 0;
  static constexpr size_t ws_off = xs_off + size_t(STAGES) * Cfg::BM * Cfg::LDS * 2;
  static constexpr size_t as_off = ws_off + size_t(STAGES) * Cfg::BN * Cfg::LDS * 2;
  static constexpr size_t ts_off = as_off + size_t(STAGES) * RB * Cfg::LDS * 2;
  static constexpr size_t red_off = ts_off + size_t(Cfg::BM) * TPITCH * 4;
  static constexpr size_t bytes = red_off + size_t(Cfg::WARPS_K - 1) * Cfg::BM * Cfg::BN * 4;
  static_assert(bytes <= kSmemBudget, "shared memory over budget");
  static_assert(ws_off % 16 == 0 && as_off % 16 == 0 && ts_off % 16 == 0 && red_off % 16 == 0,
                "16-byte aligned regions");
};

// ------------------------------------------------------------------------------------------------
// Host-side planning, shared by the CUDA launcher and the host emulator.
// ------------------------------------------------------------------------------------------------
// Rank tile: a_rows padded to 16, 32, 64 or 128 (0 when a_rows > 128: not supported).
inline int rank_block_for(int a_rows) {
  for (int rb = 16; rb <= 128; rb *= 2)
    if (a_rows <= rb) return rb;
  return 0;
}

// M <= 32: the decode tile (one or two 16-row blocks re-read W from L2 at most once). Reasoning,
// not measured: the crossover is to be measured on the GPU (bench/).
inline int tile_kind_for(int64_t M) { return M <= 32 ? kTileSmall : kTileLarge; }

// Consecutive N tiles per CTA, d: t = x.A^T is recomputed once per CTA, so its extra
// tensor-core work is RB / (BN * d) of the base product, but fewer CTAs may leave SMs idle. With
// one CTA per SM at a time, the launch takes ceil(CTAs / num_sms) waves of d tile-times each:
// the d with the fewest tile-times wins, the largest among equals (least t work). E.g. N = 14336
// (112 tiles), 2 row blocks, 132 SMs: d = 1 runs 224 CTAs in 2 waves (the second 70% full),
// d = 2 runs 112 CTAs in one wave of 2 tiles -- the same time, half the t work. (A model, not
// measured: bench/ on the GPU is where it gets checked.) d need not divide the tile count: a row
// block's last CTA then sweeps fewer tiles.
inline int tiles_per_cta_for(int64_t num_m_blocks, int64_t num_n_tiles, int num_sms) {
  int64_t best = 1, best_time = -1;
  for (int64_t d = 1; d <= num_n_tiles; ++d) {
    const int64_t ctas = num_m_blocks * ceil_div(num_n_tiles, d);
    const int64_t time = ceil_div(ctas, num_sms > 0 ? num_sms : 1) * d;
    if (best_time < 0 || time <= best_time) best = d, best_time = time;
  }
  return int(best);
}

// Calls f(Cfg{}, std::integral_constant<int, RB>{}) for the given tile kind and rank block;
// false when the pair is not one of the compiled ones.
template <class F>
inline bool dispatch_tile(int tile_kind, int rb, F&& f) {
  auto by_rank = [&](auto cfg) {
    switch (rb) {
      case 16: f(cfg, std::integral_constant<int, 16>{}); return true;
      case 32: f(cfg, std::integral_constant<int, 32>{}); return true;
      case 64: f(cfg, std::integral_constant<int, 64>{}); return true;
      case 128: f(cfg, std::integral_constant<int, 128>{}); return true;
      default: return false;
    }
  };
  if (tile_kind == kTileSmall) return by_rank(SmallTile{});
  if (tile_kind == kTileLarge) return by_rank(LargeTile{});
  return false;
}

struct LaunchPlan {
  int tile_kind = 0, rb = 0, tiles_per_cta = 1, group_m = 8, threads = 0;
  int64_t grid = 0;
  size_t smem_bytes = 0;
  const char* error = nullptr;  // a sentence when the problem cannot be launched
};

// tile_override / tiles_override: 0 = the heuristics above (tests use them to reach every path).
inline LaunchPlan plan_lora_linear(int64_t M, int64_t N, int a_rows, int num_sms, int tile_override,
                                   int tiles_override) {
  LaunchPlan plan;
  plan.rb = rank_block_for(a_rows);
  if (plan.rb == 0) {
    plan.error = "the rank (twice the rank for float32 adapters) exceeds the CUDA kernel's limit of 128";
    return plan;
  }
  plan.tile_kind = tile_override ? tile_override : tile_kind_for(M);
  bool ok = dispatch_tile(plan.tile_kind, plan.rb, [&](auto cfg, auto rb) {
    using Cfg = decltype(cfg);
    const int64_t m_blocks = ceil_div(M, Cfg::BM), n_tiles = ceil_div(N, Cfg::BN);
    plan.tiles_per_cta = tiles_override > 0 ? int(tiles_override < n_tiles ? tiles_override : n_tiles)
                                            : tiles_per_cta_for(m_blocks, n_tiles, num_sms);
    plan.grid = m_blocks * ceil_div(n_tiles, plan.tiles_per_cta);
    plan.threads = Cfg::NTHREADS;
    plan.smem_bytes = SmemLayout<Cfg, decltype(rb)::value>::bytes;
  });
  if (!ok) plan.error = "unknown tile kind";
  else if (plan.grid > 0x7FFFFFFF) plan.error = "the problem needs more than 2^31 - 1 CTAs";
  return plan;
}

}  // namespace lora_kernels
