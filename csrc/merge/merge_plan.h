// Parameters, layout canonicalisation and launch planning of the in-place merge kernel
// (csrc/merge/merge.cuh): plain C++17 (no CUDA, no torch), shared by the kernel, the CUDA launcher
// (merge_kernels.cu), the torch-facing launcher (merge.cpp) and the host emulator
// (tests/cuda_emulation/run_merge.cpp), so that the emulator tests the launcher's layout logic too.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "common/plan_common.h"  // LK_HOST_DEVICE

namespace lora_kernels {

// ------------------------------------------------------------------------------------------------
// Modes (lora_kernels/triton/merge.py's MODE_*) and exact-unmerge codes (lora_kernels/reference.py's
// CODE_*): every backend writes and reads the same codes.
// ------------------------------------------------------------------------------------------------
enum MergeMode : int { kMergeApply = 0, kMergeCountNonfinite = 1, kMergeExact = 2, kUnmergeExact = 3 };

constexpr int kCodeEscape = -128;   // W0 is in the escape table
constexpr int kCodePending = -127;  // the escape table was full: the element was left unmerged
constexpr int kCodePosZero = -126;  // W0 is +0.0
constexpr int kCodeNegZero = -125;  // W0 is -0.0
constexpr int kCodeMin = -124;      // kCodeMin..kCodeMax: W0 = U shifted by `code` representable values
constexpr int kCodeMax = 127;
constexpr int kCodeMinRestored = kCodePosZero;  // codes >= this are restored by the unmerge pass

// ------------------------------------------------------------------------------------------------
// The kernel works on a canonical problem W'[P, Q] += delta[P, Q], delta[p, q] = scale * sum_j
// U[p, j] V[j, q], where Q is W's contiguous (smallest-stride) dimension. For a weight whose
// logical [N, K] layout has K contiguous (nn.Linear) that is P = N, Q = K, U = B, V = A; for one
// with N contiguous (fan_in_fan_out, column-major) P = K, Q = N, U = A^T, V = B^T. Both sum the
// same products over j in the same order, so both give the same bits.
// ------------------------------------------------------------------------------------------------
struct MergeParams {
  void* w;                // W' (p, q) at w + p * ldw_p + q * ldw_q (elements of W's dtype)
  const void* u;          // U (p, j) at u + p * ldu_p + j * ldu_r (adapter dtype)
  const void* v;          // V (j, q) at v + j * ldv_r + q * ldv_q
  int8_t* codes;          // exact modes: (p, q) at codes + p * ldc_p + q * ldc_q
  int64_t* esc_index;     // MERGE_EXACT: escape table [esc_capacity], logical index n * K + k ...
  void* esc_value;        // ... and the exact W0 (W's dtype)
  int32_t* status;        // [2]: status[0] += escapes (MERGE_EXACT), status[1] += non-finite (COUNT)
  int64_t P, Q;
  int rank;               // r >= 1
  int64_t ldw_p, ldw_q, ldu_p, ldu_r, ldv_r, ldv_q, ldc_p, ldc_q;
  int64_t idx_p, idx_q;   // escape index of (p, q) = p * idx_p + q * idx_q
  int64_t esc_capacity;
  float scale;
  int mode;               // MergeMode
  bool subtract;          // APPLY / COUNT: W - delta instead of W + delta
  bool gated;             // APPLY / MERGE_EXACT: do nothing when status[1] != 0 (safe merge)
  bool w_vec;             // W rows: unit stride along q, 16-byte aligned base and row stride
  bool c_vec;             // codes rows: unit stride along q, base and row stride aligned to the
                          // codes' vector width (kMergeVecElems bytes)
  int rank_chunk;         // rank columns held in shared memory at a time (multiple of the MMA k)
  int pitch;              // shared-memory row pitch in adapter elements
};

// Logical layout as the op sees it ([N, K] weight strides after undoing fan_in_fan_out, adapter
// strides), turned into MergeParams' canonical fields. Pointers are filled by the caller.
struct MergeLayout {
  bool transposed;  // P = K, Q = N
  int64_t P, Q, ldw_p, ldw_q, ldu_p, ldu_r, ldv_r, ldv_q, ldc_p, ldc_q, idx_p, idx_q;
};

// N, K: logical sizes; sn, sk: the weight's strides along N and K; a_r, a_k: lora_a [r, K]
// strides; b_n, b_r: lora_b [N, r] strides; cn, ck: the codes' strides (0 when there are none).
inline MergeLayout canonical_merge_layout(int64_t N, int64_t K, int64_t sn, int64_t sk, int64_t a_r,
                                          int64_t a_k, int64_t b_n, int64_t b_r, int64_t cn, int64_t ck) {
  // Q is the dimension with unit stride (so rows of W' can be read as 16-byte vectors); without
  // one, the smaller stride (better locality); a size-1 dimension never decides.
  bool transposed;
  if (K > 1 && sk == 1) transposed = false;
  else if (N > 1 && sn == 1) transposed = true;
  else if (K > 1 && N > 1) transposed = sn < sk;
  else transposed = K == 1 && N > 1;
  MergeLayout l{};
  l.transposed = transposed;
  if (!transposed) {
    l.P = N; l.Q = K; l.ldw_p = sn; l.ldw_q = sk;
    l.ldu_p = b_n; l.ldu_r = b_r;          // U = B
    l.ldv_r = a_r; l.ldv_q = a_k;          // V = A
    l.ldc_p = cn; l.ldc_q = ck;
    l.idx_p = K; l.idx_q = 1;
  } else {
    l.P = K; l.Q = N; l.ldw_p = sk; l.ldw_q = sn;
    l.ldu_p = a_k; l.ldu_r = a_r;          // U[k, j] = A[j, k]
    l.ldv_r = b_r; l.ldv_q = b_n;          // V[j, n] = B[n, j]
    l.ldc_p = ck; l.ldc_q = cn;
    l.idx_p = 1; l.idx_q = K;
  }
  return l;
}

// ------------------------------------------------------------------------------------------------
// Tiles. Design reasoning for H100/H200, not measured (no GPU was available when it was written;
// bench/merge.py is where it gets measured):
//  * The merge streams W once: 2 bytes read + 2 written per bf16 element against r multiply-adds.
//    On CUDA cores (67 fp32 TFLOP/s) r = 64 alone would take 2x the copy time of W (4.2 TB/s on
//    an H200), so delta is formed on tensor cores (mma.sync; products of 16-bit adapters are exact,
//    sums in fp32; fp32 adapters as 3xTF32, fp32-accurate), which leaves the kernel memory-bound.
//  * A warp owns a 16 x 64 block of W': one m16 MMA row block and 8 n8 column tiles. The MMA's
//    columns are assigned to logical columns by a permutation (merge_column below) such that each
//    thread owns 16 *contiguous* elements of two rows, i.e. 16-byte vectors straight from global
//    memory into registers: no shared-memory staging of W, and every load instruction of a warp
//    covers whole 32-byte sectors (64 contiguous bytes per row).
//  * 8 warps as 4 (P) x 2 (Q): a 64 x 128 CTA tile, 16 KB of a 16-bit W (32 KB fp32). A CTA
//    walks a contiguous range of tiles in strip-major order (down a 128-column strip), keeping the
//    strip's V^T in shared memory across its tiles (when the rank fits one chunk) and reloading
//    only U [64 x r] per tile: adapter traffic from L2 is r / 128 of W's (12.5% at r = 16).
//  * The grid is one wave (SMs x resident CTAs): every CTA gets an equal share of tiles (+-1), and
//    each thread prefetches the next tile's W (and codes) into registers while the current tile's
//    delta is formed, so about 2 x 16 KB per CTA are in flight -- an H200 needs ~35 KB per SM
//    (4.8 TB/s x ~1 us latency / 132 SMs) and 2-3 CTAs are resident.
//  * Rank chunk 64: shared memory (64 + 128) x (64 + pad) adapter elements = 27 KB (16-bit) or
//    51 KB (fp32); ranks above 64 loop over chunks (V^T is then reloaded per tile).
//  * __launch_bounds__(256, 2): 128 registers. ptxas (nvcc 13.0, sm_80 and sm_90a) reports 8-28
//    bytes of spill stores per variant (a few loop-state words); whether that costs anything, and
//    whether prefetching the next tile's U too would pay, is for the GPU to say.
// ------------------------------------------------------------------------------------------------
constexpr int kMergeWarpsP = 4, kMergeWarpsQ = 2;
constexpr int kMergeThreads = 32 * kMergeWarpsP * kMergeWarpsQ;
constexpr int kMergeWarpRows = 16, kMergeWarpCols = 64;       // one m16 block x 8 n8 tiles
constexpr int kMergeNTiles = kMergeWarpCols / 8;
constexpr int kMergeTileP = kMergeWarpsP * kMergeWarpRows;    // 64
constexpr int kMergeTileQ = kMergeWarpsQ * kMergeWarpCols;    // 128
constexpr int kMergeRankChunk = 64;
constexpr int kMergeElemsPerThreadRow = 16;                    // contiguous elements per thread per row

// Elements per 16-byte vector of W: 8 (16-bit) or 4 (fp32). Also the byte width of a codes vector.
LK_HOST_DEVICE constexpr int merge_vec_elems(int w_bytes) { return 16 / w_bytes; }

// The permutation of a warp's 64 columns: MMA column i (0..7) of n8 tile nt holds logical column
// merge_column(nt, i). Lane (g, c) of an MMA accumulator holds columns i = 2c, 2c + 1, so thread c
// owns logical columns v * 4 * VE + c * VE + [0, VE) for v = 0 .. 16 / VE - 1: contiguous vectors,
// and lanes c = 0..3 of a row cover 4 * VE contiguous columns (64 bytes) per vector index v.
LK_HOST_DEVICE constexpr int merge_column(int nt, int i, int vec_elems) {
  return (nt / (vec_elems / 2)) * (4 * vec_elems) + (i / 2) * vec_elems + (nt % (vec_elems / 2)) * 2 + (i % 2);
}

// Rank columns per shared-memory chunk (a multiple of the MMA k: 16 for 16-bit adapters, 8 for
// tf32) and the row pitch: rank_chunk + 16 bytes, so that a row is an odd number of 16-byte units
// and the 8 row addresses of one ldmatrix fall in distinct bank groups.
inline int merge_rank_chunk(int rank, bool adapter_fp32) {
  const int k = adapter_fp32 ? 8 : 16;
  const int r = rank < kMergeRankChunk ? rank : kMergeRankChunk;
  return (r + k - 1) / k * k;
}
inline int merge_pitch(int rank_chunk, bool adapter_fp32) { return rank_chunk + (adapter_fp32 ? 4 : 8); }
inline size_t merge_smem_bytes(int pitch, bool adapter_fp32) {
  return size_t(kMergeTileP + kMergeTileQ) * size_t(pitch) * (adapter_fp32 ? 4 : 2);
}

LK_HOST_DEVICE inline int64_t merge_num_tiles(int64_t P, int64_t Q) {  // < 2^31 (cuda_merge_ checks)
  return ((P + kMergeTileP - 1) / kMergeTileP) * ((Q + kMergeTileQ - 1) / kMergeTileQ);
}

// One wave of CTAs, each with an equal share of the tiles (see above).
inline int64_t merge_grid(int64_t P, int64_t Q, int num_sms, int ctas_per_sm) {
  const int64_t tiles = merge_num_tiles(P, Q);
  const int64_t wave = int64_t(num_sms > 0 ? num_sms : 1) * (ctas_per_sm > 0 ? ctas_per_sm : 1);
  return tiles < wave ? tiles : wave;
}

// Whether `ptr` and every row start (row stride `ld` elements of `elem_bytes`) are `align`-byte aligned.
inline bool merge_rows_aligned(const void* ptr, int64_t ld, int64_t rows, int elem_bytes, int align) {
  if (reinterpret_cast<uintptr_t>(ptr) % uintptr_t(align) != 0) return false;
  return rows <= 1 || (ld * elem_bytes) % align == 0;
}

// ------------------------------------------------------------------------------------------------
// MergeParams from what a launcher knows (torch-free, so the emulator runs the same code).
// ------------------------------------------------------------------------------------------------
struct MergeArgs {
  void* w;                     // the weight as stored: [rows, cols] with strides (s0, s1); logical
  int64_t rows, cols, s0, s1;  // [N, K] is its transpose when fan_in_fan_out
  bool fan_in_fan_out;
  int w_bytes;                 // 2 or 4
  const void* a;               // lora_a [rank, K], strides (a_s0, a_s1)
  int64_t a_s0, a_s1;
  const void* b;               // lora_b [N, rank], strides (b_s0, b_s1)
  int64_t b_s0, b_s1;
  int rank;
  bool adapter_fp32;           // else 16-bit adapters of the weight's dtype
  int8_t* codes;               // the weight's shape, strides (c_s0, c_s1), or null
  int64_t c_s0, c_s1;
  int64_t* esc_index;
  void* esc_value;
  int64_t esc_capacity;
  int32_t* status;
  float scale;
  int mode;
  bool subtract, gated;
};

inline MergeLayout merge_layout_of(const MergeArgs& x) {
  const int64_t N = x.fan_in_fan_out ? x.cols : x.rows, K = x.fan_in_fan_out ? x.rows : x.cols;
  const int64_t sn = x.fan_in_fan_out ? x.s1 : x.s0, sk = x.fan_in_fan_out ? x.s0 : x.s1;
  const int64_t cn = x.fan_in_fan_out ? x.c_s1 : x.c_s0, ck = x.fan_in_fan_out ? x.c_s0 : x.c_s1;
  return canonical_merge_layout(N, K, sn, sk, x.a_s0, x.a_s1, x.b_s0, x.b_s1, cn, ck);
}

inline MergeParams make_merge_params(const MergeArgs& x) {
  const MergeLayout l = merge_layout_of(x);
  MergeParams p{};
  p.w = x.w;
  p.u = l.transposed ? x.a : x.b;
  p.v = l.transposed ? x.b : x.a;
  p.codes = x.codes;
  p.esc_index = x.esc_index;
  p.esc_value = x.esc_value;
  p.status = x.status;
  p.P = l.P; p.Q = l.Q;
  p.rank = x.rank;
  p.ldw_p = l.ldw_p; p.ldw_q = l.ldw_q;
  p.ldu_p = l.ldu_p; p.ldu_r = l.ldu_r;
  p.ldv_r = l.ldv_r; p.ldv_q = l.ldv_q;
  p.ldc_p = l.ldc_p; p.ldc_q = l.ldc_q;
  p.idx_p = l.idx_p; p.idx_q = l.idx_q;
  p.esc_capacity = x.esc_capacity;
  p.scale = x.scale;
  p.mode = x.mode;
  p.subtract = x.subtract;
  p.gated = x.gated;
  const int ve = merge_vec_elems(x.w_bytes);
  p.w_vec = l.ldw_q == 1 && merge_rows_aligned(x.w, l.ldw_p, l.P, x.w_bytes, 16);
  p.c_vec = x.codes != nullptr && l.ldc_q == 1 && merge_rows_aligned(x.codes, l.ldc_p, l.P, 1, ve);
  p.rank_chunk = merge_rank_chunk(x.rank, x.adapter_fp32);
  p.pitch = merge_pitch(p.rank_chunk, x.adapter_fp32);
  return p;
}

}  // namespace lora_kernels
