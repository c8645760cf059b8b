// Launch parameters, tile shapes and shared-memory layouts of the multi-adapter (segmented)
// shrink / expand kernels: plain C++17 (no CUDA, no torch), shared by the kernels
// (multi_lora.cuh), the CUDA launcher (multi_lora_kernels.cu), the torch-facing launcher
// (multi_lora.cpp) and the host emulator (tests/cuda_emulation/run_multi_lora.cpp).
//
// The work comes from an AdapterIndex (lora_kernels/serving.py): token ids sorted by adapter slot
// (`sorted_tokens` [M]) and a fixed-length work list of pieces (slot, first sorted position,
// length <= item_m) as int32 rows of 3; slot -1 is the no-adapter group, length 0 a padding row.
// The CUDA kernels read exactly what the Triton kernels read, so both backends take one index.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "lora_linear/lora_linear_plan.h"  // LK_HOST_DEVICE, ceil_div, rows_16byte_aligned

namespace lora_kernels {

// ------------------------------------------------------------------------------------------------
// Parameters of one launch (plain data: the kernel argument).
// ------------------------------------------------------------------------------------------------
// Several output slices (q/k/v with GQA's different widths, gate/up) go in one launch: the grid's
// z dimension is the slice. The shrink's slices differ only in their A stack's address (one
// shape, dtype and set of strides: the launcher groups stacks so); each expand slice has its own
// row of a small table (B's address, strides, width and first column of y). A CTA picks its
// slice's values with compares and selects, not a dynamic index into the kernel parameters.
// Why the shrink shares strides (ptxas -v, sm_80, CUDA 13.0): a per-slice copy of the strides
// took its CUDA-core path from 155-163 to 225 registers (or, capped at 168, to 140 bytes of
// spills); one pointer per slice, with the CUDA-core path's rank rows addressed from one base
// per pass, costs 168 and no spills (the old kernel: 155-163). The expand: 119 with a full row.
constexpr int kMultiMaxSlices = 4;

struct MultiShrinkParams {
  const uint16_t* x;             // [M, K] 16-bit, unit stride along K
  const void* a[kMultiMaxSlices];  // slices [0, S): [L, R, K] 16-bit (x's type) or fp32 (a_fp32), unit stride along K
  const float* scales;           // [L] fp32, contiguous
  const int32_t* ranks;          // [L] int32, contiguous; null = every slot has rank R
  const int32_t* work;           // [num_items, 3] (slot, start, length), contiguous
  const int32_t* sorted_tokens;  // [M]
  float* t;                      // [S, M, R] fp32, unit column stride
  int64_t M, K, num_items;
  int R;                         // r_max (<= kMultiMaxRank)
  int L;                         // slots: a work-list slot outside [-1, L) is read as -1
  int S;                         // slices, 1..kMultiMaxSlices (the grid's z extent)
  int32_t* bad_slot;             // set to 1 when such a slot is seen; null = not reported
  int item_m;                    // the work list's piece size (the tile's BM bounds it)
  int row_split;                 // 1, or kDecodeRowSplit: each piece split into sub-pieces of
                                 // kGemvMaxRows rows, one CTA each (grid y = sub-piece x rank chunk)
  int64_t ldx;                   // x row stride (elements)
  int64_t lda_l, lda_r;          // every A stack's strides (elements)
  int64_t ldt_s, ldt;            // t slice and row strides (elements)
  bool a_fp32;
  bool x_vec;                    // x rows 16-byte aligned (base and ldx): 16-byte loads, cp.async
  bool a_vec;                    // the same for every row of every A stack
};

struct MultiExpandSlice {
  const void* b;                 // [L, N, R] 16-bit (y's type) or fp32 (b_fp32), any strides
  int64_t N;                     // this slice's width
  int64_t col;                   // its first column of y
  int64_t ldb_l, ldb_n, ldb_r;
  bool b_vec;                    // ldb_r == 1 and every B row 16-byte aligned: 16-byte loads
  bool y_pairs;                  // ldy_n == 1, y's column `col` 4-byte aligned in every row:
                                 // two adjacent outputs update as one 32-bit word
};

struct MultiExpandParams {
  uint16_t* y;                   // [M, N_y] 16-bit, any strides (no internal overlap), in place
  const float* t;                // [S, M, R] fp32, any strides
  MultiExpandSlice slices[kMultiMaxSlices];  // rows [0, S) used; one dtype (b_fp32) for all
  const int32_t* ranks;          // [L] int32 contiguous; null = every slot has rank R
  const int32_t* work;           // [num_items, 3]
  const int32_t* sorted_tokens;  // [M]
  int64_t M, num_items;
  int R;
  int L;                         // slots: a work-list slot outside [-1, L) is read as -1
  int S;                         // slices, 1..kMultiMaxSlices (the grid's z extent)
  int32_t* bad_slot;             // set to 1 when such a slot is seen; null = not reported
  int item_m;
  int64_t ldy_m, ldy_n;
  int64_t ldt_s, ldt_m, ldt_r;
  bool b_fp32;
};

// The largest r_max the kernels take: vLLM's largest max_lora_rank. Nothing on chip grows with
// it: the shrink's grid has a rank-chunk dimension, the expand stages t in shared memory
// kExpandRankChunk columns at a time (accumulating every chunk into the same fp32 registers), and
// multi_lora_linear's epilogue walks the rank 8 columns a step, t read from global memory.
constexpr int kMultiMaxRank = 512;
constexpr int kExpandRankChunk = 128;  // the t tile of the expand: [64 rows][128 + 4] fp32, 33 KB

// Pieces of at most this many tokens run on CUDA cores ("GEMV" path); longer ones on tensor
// cores. Reasoning, not measured (no GPU was available): a decode piece of 1..4 tokens gains
// nothing from a 16-row MMA tile -- its cost is streaming the adapter (r x K of A, N x r of B)
// once. The CUDA-core path issues those loads straight from global memory, spread over every
// thread of the CTA (no shared-memory staging, no pipeline fill), and keeps each loaded adapter
// element in a register for all of the piece's tokens; 4 tokens x 16 rank rows of fp32 partial
// sums per thread is as many registers as it can hold beside the loads in flight. At 5+ tokens
// an adapter element feeds enough products that tensor cores pay for the staging.
constexpr int kGemvMaxRows = 4;
constexpr int kGemvRankRows = 16;  // rank rows per pass of the shrink's CUDA-core path
constexpr int kMultiThreads = 128;

// ------------------------------------------------------------------------------------------------
// Shrink tiles: a CTA computes t for one piece (BM >= item_m rows) and one chunk of RB rank
// columns, over the whole K. Design reasoning for A100/H100 (not measured):
//  * ShrinkSmall (16-item work list, decode-like batches): 16 x 16, K slices of 128 split across
//    the 4 warps (one 16x16 output needs little MMA work, so warps share K and sum through shared
//    memory). Rank chunks of 16 give rank/16 CTAs per piece: more CTAs streaming A for the few
//    pieces of a small batch. 4 stages keep 4 x 8 KB of x and A in flight per CTA.
//  * ShrinkLarge (64-item work list, large prefill batches): 64 x 64, warps 2 x 2 (32 x 32 each),
//    K slices of 64, 3 stages. Each A tile is reused over 64 tokens; a rank of 128 takes two
//    chunks (x re-read once, from L2).
// Rank columns past an adapter's rank are never loaded (zero-filled in shared memory), and MMA
// tiles wholly past the rank or past the piece's rows are skipped.
// ------------------------------------------------------------------------------------------------
template <int BM_, int RB_, int BK_, int WARPS_M_, int WARPS_N_, int WARPS_K_, int STAGES_>
struct ShrinkConfig {
  static constexpr int BM = BM_, RB = RB_, BK = BK_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, WARPS_K = WARPS_K_;
  static constexpr int WARPS_MN = WARPS_M * WARPS_N;
  static constexpr int STAGES = STAGES_;
  static constexpr int NTHREADS = 32 * WARPS_MN * WARPS_K;
  static constexpr int WM = BM / WARPS_M, WN = RB / WARPS_N;
  static constexpr int MT = WM / 16, NT = WN / 8;
  static constexpr int KSTEPS = BK / 16;
  static constexpr int LDS = BK + 8;  // 16-bit tile row pitch: conflict-free ldmatrix (4 mod 8 words)
  static_assert(NTHREADS == kMultiThreads, "one block size for every multi-adapter kernel");
  static_assert(BM % (16 * WARPS_M) == 0 && RB % (8 * WARPS_N) == 0, "warp tile");
  static_assert(KSTEPS % WARPS_K == 0, "K slice split across warps");
  static_assert(((LDS / 2) % 8) == 4, "ldmatrix bank-conflict-free pitch");
  static_assert(RB % kGemvRankRows == 0, "the CUDA-core path walks the chunk in passes of 16 rows");

  // Shared memory: tok [BM] i32 | red [(WARPS_K-1) * BM * RB] f32 (K-split sums, and the
  // CUDA-core path's per-warp partial sums) | xs [STAGES][BM][LDS] u16 | as [STAGES][RB][LDS] u16
  // | as_lo [STAGES][RB][LDS] u16 (fp32 adapters only: the launch with a 16-bit A stops before it).
  static constexpr size_t red_floats_mma = size_t(WARPS_K - 1) * BM * RB;
  static constexpr size_t red_floats_gemv = size_t(NTHREADS / 32) * kGemvMaxRows * kGemvRankRows;
  static constexpr size_t red_floats = red_floats_mma > red_floats_gemv ? red_floats_mma : red_floats_gemv;
  static constexpr size_t tok_off = 0;
  static constexpr size_t red_off = ((BM * 4 + 15) / 16) * 16;
  static constexpr size_t xs_off = red_off + ((red_floats * 4 + 15) / 16) * 16;
  static constexpr size_t as_off = xs_off + size_t(STAGES) * BM * LDS * 2;
  static constexpr size_t as_lo_off = as_off + size_t(STAGES) * RB * LDS * 2;
  static constexpr size_t bytes_16bit = as_lo_off;
  static constexpr size_t bytes_fp32_a = as_lo_off + size_t(STAGES) * RB * LDS * 2;
  static_assert(bytes_fp32_a <= kSmemBudget, "shared memory over budget");
};

using ShrinkSmall = ShrinkConfig<16, 16, 128, 1, 1, 4, 4>;
using ShrinkLarge = ShrinkConfig<64, 64, 64, 2, 2, 1, 3>;

// ------------------------------------------------------------------------------------------------
// Expand tile: a CTA owns one piece (up to 64 rows) and BN = 128 output columns; the 4 warps split
// the columns (32 each) and walk the piece's rows in 16-row MMA tiles only as far as its length.
// B is read once per CTA straight into MMA fragments (each B element is used by every row of the
// piece from registers); t [rows, rank] sits in shared memory in fp32, RC = 128 rank columns at a
// time (ranks past 128 loop over chunks, two barriers each, into the same accumulators: the tile
// stays 33 KB, under the 48 KB that needs no opt-in, at any rank). Reasoning (not measured):
// 128 columns give N/128 CTAs per piece (32 at N = 4096), enough for the decode batches' few
// pieces, while a 64-token piece of a long segment reuses every B element 64 times.
// ------------------------------------------------------------------------------------------------
struct ExpandConfig {
  static constexpr int BM = 64, BN = 128, WARPS = 4;
  static constexpr int NTHREADS = 32 * WARPS;
  static constexpr int WN = BN / WARPS, NT = WN / 8, MT = BM / 16;
  static constexpr int RC = kExpandRankChunk;
  static constexpr int TPITCH = RC + 4;  // fp32 t rows: conflict-free fragment reads
  static constexpr size_t tok_off = 0;
  static constexpr size_t ts_off = BM * 4;
  static constexpr size_t bytes = ts_off + size_t(BM) * TPITCH * 4;
  static_assert(NTHREADS == kMultiThreads, "one block size for every multi-adapter kernel");
  static_assert(BN == NTHREADS, "the CUDA-core path gives each thread one column");
  static_assert(RC % 8 == 0, "rank chunks are whole k8 MMA steps");
  static_assert(bytes <= 48 * 1024, "no opt-in needed");
};

enum ShrinkTile : int { kShrinkSmall = 16, kShrinkLarge = 64 };  // = the work list's item_m

// The split decode shrink: with 16-token pieces, each piece may run as 4 CTAs of 4 rows (the
// CUDA-core path) instead of 1 CTA on tensor cores -- a 16-token single-adapter batch at r = 16
// then streams K on 4 SMs instead of 1, each re-reading the adapter (from L2). Reasoning, not
// measured: a decode batch is latency-bound on the few CTAs its pieces give; bench/multi.py's
// decode cases (ours_se_cuda) are where the choice gets measured.
constexpr int kDecodeRowSplit = kShrinkSmall / kGemvMaxRows;

struct MultiLaunchPlan {
  int64_t grid_x = 0, grid_y = 0, grid_z = 1;
  int threads = kMultiThreads;
  size_t smem_bytes = 0;
  const char* error = nullptr;
};

constexpr const char* kMultiRankError = "r_max must be in [1, 512] for the CUDA kernels";
constexpr const char* kMultiSlicesError = "the CUDA kernels take 1 to 4 slices per launch";

// The checks every shrink / expand plan starts with: null, or the error of r_max R / S slices.
inline const char* rank_and_slices_error(int R, int S) {
  if (R < 1 || R > kMultiMaxRank) return kMultiRankError;
  if (S < 1 || S > kMultiMaxSlices) return kMultiSlicesError;
  return nullptr;
}

// Shrink: one CTA per (work-list piece [x sub-piece], rank chunk of RB, slice); item_m picks the
// tile; row_split (1 or kDecodeRowSplit, 16-token pieces only) splits each piece into sub-pieces.
inline MultiLaunchPlan plan_multi_shrink(int64_t num_items, int R, int item_m, bool a_fp32, int S = 1,
                                         int row_split = 1) {
  MultiLaunchPlan plan;
  plan.error = rank_and_slices_error(R, S);
  if (plan.error != nullptr) return plan;
  int rb = 0;
  if (item_m == kShrinkSmall) {
    rb = ShrinkSmall::RB;
    plan.smem_bytes = a_fp32 ? ShrinkSmall::bytes_fp32_a : ShrinkSmall::bytes_16bit;
  } else if (item_m == kShrinkLarge) {
    rb = ShrinkLarge::RB;
    plan.smem_bytes = a_fp32 ? ShrinkLarge::bytes_fp32_a : ShrinkLarge::bytes_16bit;
  } else {
    plan.error = "item_m must be 16 or 64 (the AdapterIndex work lists)";
    return plan;
  }
  if (row_split != 1 && !(row_split == kDecodeRowSplit && item_m == kShrinkSmall)) {
    plan.error = "row_split must be 1, or 4 with item_m 16";
    return plan;
  }
  plan.grid_x = num_items;
  plan.grid_y = ceil_div(R, rb) * row_split;
  plan.grid_z = S;
  if (plan.grid_x > 0x7FFFFFFF) plan.error = "the work list has more than 2^31 - 1 pieces";
  return plan;
}

// Expand: one CTA per (work-list piece, BN columns, slice); N is the widest slice's width (a
// narrower slice's CTAs past its width return at once). Pieces of 16 or 64 tokens both fit the tile.
inline MultiLaunchPlan plan_multi_expand(int64_t num_items, int64_t N, int R, int item_m, int S = 1) {
  MultiLaunchPlan plan;
  plan.error = rank_and_slices_error(R, S);
  if (plan.error != nullptr) return plan;
  if (item_m != 16 && item_m != 64) {
    plan.error = "item_m must be 16 or 64 (the AdapterIndex work lists)";
    return plan;
  }
  plan.grid_x = num_items;
  plan.grid_y = ceil_div(N, ExpandConfig::BN);
  plan.grid_z = S;
  plan.smem_bytes = ExpandConfig::bytes;
  if (plan.grid_x > 0x7FFFFFFF) plan.error = "the work list has more than 2^31 - 1 pieces";
  else if (plan.grid_y > 65535) plan.error = "N needs more than 65535 column tiles of 128";
  return plan;
}

// ------------------------------------------------------------------------------------------------
// Fused base GEMM + per-token adapters (multi_lora_linear), over the sorted token order:
//   y[tok, n] = sum_k x[tok, k] W[n, k] + bias[n] + sum_{j < rank_i} t[tok, j] B[i, n, j]
// with t the segmented shrink's output (scaled, fp32). One CTA owns BM consecutive sorted
// positions (so a row block holds few adapters: one inside a long segment) and a run of BN-wide
// output tiles; the epilogue adds one rank-deep tensor-core product per segment in the block, then
// the bias, and stores each element once. Tiles: lora_linear_plan.h's SmallTile / LargeTile.
// ------------------------------------------------------------------------------------------------
struct MultiLinearParams {
  const uint16_t* x;             // [M, K] 16-bit, unit stride along K
  const uint16_t* w;             // [N, K] 16-bit, unit stride along K
  const void* b;                 // [L, N, R] 16-bit (x's type) or fp32 (b_fp32), any strides
  const void* bias;              // [N] contiguous, 16-bit or fp32 (bias_fp32), or null
  const float* t;                // [M, R] fp32: the shrink's output, any strides
  const int32_t* ranks;          // [L] int32 contiguous; null = every slot has rank R
  const int32_t* sorted_tokens;  // [M]
  const int32_t* sorted_adapter; // [M]: slot at each sorted position, -1 = none
  const int32_t* slot_start;     // [L + 2]: slot s occupies sorted positions [slot_start[s], slot_start[s+1])
  uint16_t* y;                   // [M, N], unit column stride
  int64_t M, N, K;
  int L, R;
  int64_t ldx, ldw, ldy;
  int64_t ldt_m, ldt_r;
  int64_t ldb_l, ldb_n, ldb_r;
  bool b_fp32, bias_fp32;
  bool aligned16;                // x and W: base pointers 16-byte aligned and row strides multiples of 8
  bool y_pairs;                  // two adjacent outputs store as one aligned 32-bit word
  int tiles_per_cta, group_m;
};

// Shared memory: tok [BM] i32 | xs [STAGES][BM][LDS] u16 | ws [STAGES][BN][LDS] u16 |
// red [WARPS_K - 1][BM * BN] f32 (K-splitting warps' partial sums).
template <class Cfg>
struct MultiLinearSmem {
  static constexpr size_t stage_bytes = size_t(Cfg::BM + Cfg::BN) * Cfg::LDS * 2;
  static constexpr size_t tok_off = 0;
  static constexpr size_t xs_off = ((Cfg::BM * 4 + 15) / 16) * 16;
  static constexpr int STAGES = Cfg::MAX_STAGES;
  static constexpr size_t ws_off = xs_off + size_t(STAGES) * Cfg::BM * Cfg::LDS * 2;
  static constexpr size_t red_off = ws_off + size_t(STAGES) * Cfg::BN * Cfg::LDS * 2;
  static constexpr size_t bytes = red_off + size_t(Cfg::WARPS_K - 1) * Cfg::BM * Cfg::BN * 4;
  static_assert(bytes <= kSmemBudget, "shared memory over budget");
  static_assert(ws_off % 16 == 0 && red_off % 16 == 0, "16-byte aligned regions");
};

// tile_override / tiles_override: 0 = lora_linear_plan.h's heuristics (tests reach every path).
inline LaunchPlan plan_multi_linear(int64_t M, int64_t N, int R, int tile_override, int tiles_override) {
  LaunchPlan plan;
  if (R < 1 || R > kMultiMaxRank) {
    plan.error = kMultiRankError;
    return plan;
  }
  plan.tile_kind = tile_override ? tile_override : tile_kind_for(M);
  auto fill = [&](auto cfg) {
    using Cfg = decltype(cfg);
    const int64_t m_blocks = ceil_div(M, Cfg::BM), n_tiles = ceil_div(N, Cfg::BN);
    // One tile per CTA by default: with t precomputed a CTA has nothing to reuse across tiles
    // (the single-adapter kernel sweeps several to reuse its in-kernel t); tests sweep several.
    plan.tiles_per_cta = tiles_override > 0 ? int(tiles_override < n_tiles ? tiles_override : n_tiles) : 1;
    plan.grid = m_blocks * ceil_div(n_tiles, plan.tiles_per_cta);
    plan.threads = Cfg::NTHREADS;
    plan.smem_bytes = MultiLinearSmem<Cfg>::bytes;
  };
  if (plan.tile_kind == kTileSmall) fill(SmallTile{});
  else if (plan.tile_kind == kTileLarge) fill(LargeTile{});
  else plan.error = "unknown tile kind";
  if (plan.error == nullptr && plan.grid > 0x7FFFFFFF) plan.error = "the problem needs more than 2^31 - 1 CTAs";
  return plan;
}

}  // namespace lora_kernels
