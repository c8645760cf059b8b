// Hopper (sm_90a) fused LoRA linear on CUTLASS 4: a TMA + wgmma warp-specialized cooperative
// GEMM with a persistent tile scheduler, whose K loop continues past the base product's K into a
// "tail" of extra K blocks read through a second pair of TMA descriptors, on the same fp32
// accumulator; the bias is added in the epilogue (CUTLASS's per-column-bias visitor tree).
//
//   y[M, N] = x[M, K] @ w[N, K].T + tail_x[M, L] @ tail_w[N, L].T + bias[N]
//
// The backward's dx is the same GEMM with the B operands in the other layout (MN-major: the
// output dimension contiguous), so that W and A are read as they are stored, never transposed:
//
//   dx[M, K] = dy[M, N] @ w[N, K] + tail_x[M, L] @ tail_w[L, K]        (no bias)
//
// (in GEMM terms: output columns K, reduction N; the template parameter LayoutW says which).
// Our own device code is the producer's K loop below (which descriptor a k-block comes from);
// the consumer warpgroups' wgmma loop, the pipeline, the scheduler and the epilogue are CUTLASS's.
// Torch-free: included only by lora_linear_sm90_{,dx_}{bf16,fp16}.cu. Needs sm_90a (wgmma, TMA).
#pragma once

// CUTLASS's device-side asserts compile to calls (__assertfail), and ptxas serializes wgmma
// across any call in the kernel (warning C7510, "wgmma.mma_async instructions are serialized
// due to wgmma pipeline crossing function boundary": every kernel here had it without NDEBUG,
// nvcc 13.0). So these translation units build with NDEBUG, as CUTLASS's own release builds
// do; <cassert> re-reads it at each inclusion. tests/test_cuda_sm90_build.py checks that the
// kernels hold no CALL and that ptxas says no C7510.
#ifndef NDEBUG
#define NDEBUG
#endif

#include <cuda_runtime_api.h>

#include <atomic>

#include "cute/tensor.hpp"
#include "cutlass/cluster_launch.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"

#include "lora_linear/lora_linear_sm90.h"

namespace lora_kernels {
namespace sm90 {

using namespace cute;

// A CUTLASS sm90 TMA warp-specialized mainloop (`Base`, from the CollectiveBuilder) whose
// producer loads k-block k from (x, w) for k < k_main_tiles and from (tail_x, tail_w) at
// k - k_main_tiles after that. The problem shape the kernel sees has K' = k_main_tiles * BK + L,
// so its k-block count is k_main_tiles + ceil(L / BK); the partial last block of each part is
// zero-filled by TMA (out-of-bounds boxes read zeros), so the two parts never mix in a block.
// The consumer side (Base::mma, Base::mma_tail) is unchanged: shared memory is shared memory.
template <class Base>
struct TailMainloop : Base {
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TileShape;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using ClusterShape = typename Base::DispatchPolicy::ClusterShape;
  using TmaA = typename Base::Params::TMA_A;
  using TmaB = typename Base::Params::TMA_B;
  static constexpr int BK = size<2>(TileShape{});

  struct Arguments {
    typename Base::Arguments base;  // x (ptr_A, dA) and w (ptr_B, dB)
    ElementA const* ptr_tail_x;
    StrideA d_tail_x;
    ElementB const* ptr_tail_w;
    StrideB d_tail_w;
    int k_main;  // K of x and w (the problem shape carries K')
    int k_tail;  // L
  };

  struct Params : Base::Params {
    TmaA tma_load_tail_x;
    TmaB tma_load_tail_w;
    int k_main_tiles;
  };

  static int main_tiles(int k_main) { return (k_main + BK - 1) / BK; }

  // K' of the problem shape: the base K rounded up to whole k-blocks, then the tail.
  static int k_total(int k_main, int k_tail) { return main_tiles(k_main) * BK + k_tail; }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void* workspace) {
    auto [M, N, K_total, L] = append<4>(problem_shape, 1);
    Params params;
    static_cast<typename Base::Params&>(params) =
        Base::to_underlying_arguments(make_shape(M, N, args.k_main, L), args.base, workspace);
    auto tail_x = make_tensor(reinterpret_cast<InternalElementA const*>(args.ptr_tail_x),
                              make_layout(make_shape(M, args.k_tail, L), args.d_tail_x));
    auto tail_w = make_tensor(reinterpret_cast<InternalElementB const*>(args.ptr_tail_w),
                              make_layout(make_shape(N, args.k_tail, L), args.d_tail_w));
    params.tma_load_tail_x =
        make_tma_copy_A_sm90(GmemTiledCopyA{}, tail_x, SmemLayoutA{}(_, _, Int<0>{}), TileShape{}, ClusterShape{});
    params.tma_load_tail_w =
        make_tma_copy_B_sm90(GmemTiledCopyB{}, tail_w, SmemLayoutB{}(_, _, Int<0>{}), TileShape{}, ClusterShape{});
    params.k_main_tiles = main_tiles(args.k_main);
    return params;
  }

  // x and w as CUTLASS checks them (K a multiple of 8 16-bit elements); the tail's alignment (its
  // base and row stride; L itself is free, TMA zero-fills past it) is the launcher's check.
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K_total, L] = append<4>(problem_shape, 1);
    return args.k_main > 0 && args.k_tail > 0 && K_total == k_total(args.k_main, args.k_tail) &&
           Base::can_implement(make_shape(M, N, args.k_main, L), args.base);
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params);
    cute::prefetch_tma_descriptor(params.tma_load_tail_x.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_tail_w.get_tma_descriptor());
  }

  // (gA, gB) over K' (coordinate tensors: the kernel layer takes its k-block count from gA),
  // then the tail's (gT, gU) over L.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    using X = Underscore;
    auto [M, N, K_total, L] = problem_shape_MNKL;
    const int k_tail = K_total - params.k_main_tiles * BK;
    Tensor mA = params.tma_load_a.get_tma_tensor(make_shape(M, K_total, L));
    Tensor mB = params.tma_load_b.get_tma_tensor(make_shape(N, K_total, L));
    Tensor mT = params.tma_load_tail_x.get_tma_tensor(make_shape(M, k_tail, L));
    Tensor mU = params.tma_load_tail_w.get_tma_tensor(make_shape(N, k_tail, L));
    return cute::make_tuple(local_tile(mA, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{}),
                            local_tile(mB, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{}),
                            local_tile(mT, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{}),
                            local_tile(mU, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{}));
  }

  // Producer: Base::load with the descriptor chosen per k-block (one elected thread issues TMA).
  template <class TensorA, class TensorB, class TensorT, class TensorU, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, TensorT, TensorU> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count,
                           int /*thread_idx*/, uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)

    constexpr uint32_t cluster_x = get<0>(ClusterShape{});
    const uint2 cluster_id = {block_rank_in_cluster % cluster_x, block_rank_in_cluster / cluster_x};
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;

    auto tma_a = params.tma_load_a.get_slice(cluster_id.y);
    auto tma_b = params.tma_load_b.get_slice(cluster_id.x);
    Tensor tAsA = tma_a.partition_D(sA);  // (TMA,TMA_M,TMA_K,PIPE); the tail's boxes have the same shape
    Tensor tBsB = tma_b.partition_D(sB);

    // Multicast masks as Base::load: A goes to the cluster's CTAs along N, B to those along M.
    uint16_t mcast_a = 0, mcast_b = 0;
    auto block_layout = Layout<ClusterShape>{};  // (m,n) -> block id
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>)
      for (int n = 0; n < size<1>(block_layout); ++n) mcast_a |= uint16_t(1) << block_layout(cluster_id.x, n, Int<0>{});
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>)
      for (int m = 0; m < size<0>(block_layout); ++m) mcast_b |= uint16_t(1) << block_layout(m, cluster_id.y, Int<0>{});

    // Two loops, so that only one part's partitions are live at a time (the producer warp runs
    // with 40 registers after the kernel's setmaxnreg): first the k-blocks of x @ W.T ...
    {
      Tensor tAgA = tma_a.partition_S(get<0>(load_inputs)(_, _, m_coord, _, l_coord));  // (TMA,TMA_M,TMA_K,k)
      Tensor tBgB = tma_b.partition_S(get<1>(load_inputs)(_, _, n_coord, _, l_coord));
      CUTLASS_PRAGMA_NO_UNROLL
      for (; k_tile_count > 0 && *k_tile_iter < params.k_main_tiles; --k_tile_count, ++k_tile_iter, ++smem_pipe_write) {
        pipeline.producer_acquire(smem_pipe_write);
        auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
        const int stage = smem_pipe_write.index();
        copy(params.tma_load_a.with(*barrier, mcast_a), tAgA(_, _, _, *k_tile_iter), tAsA(_, _, _, stage));
        copy(params.tma_load_b.with(*barrier, mcast_b), tBgB(_, _, _, *k_tile_iter), tBsB(_, _, _, stage));
      }
    }
    // ... then those of the tail, at k - k_main_tiles in (tail_x, tail_w).
    Tensor tTgT = params.tma_load_tail_x.get_slice(cluster_id.y).partition_S(get<2>(load_inputs)(_, _, m_coord, _, l_coord));
    Tensor tUgU = params.tma_load_tail_w.get_slice(cluster_id.x).partition_S(get<3>(load_inputs)(_, _, n_coord, _, l_coord));
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count, ++k_tile_iter, ++smem_pipe_write) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const int kt = *k_tile_iter - params.k_main_tiles;
      copy(params.tma_load_tail_x.with(*barrier, mcast_a), tTgT(_, _, _, kt), tAsA(_, _, _, stage));
      copy(params.tma_load_tail_w.with(*barrier, mcast_b), tUgU(_, _, _, kt), tBsB(_, _, _, stage));
    }
  }
};

// The kernel for one element type and tile: the mainloop and epilogue from CUTLASS's builders
// (stage count: as many as fit beside the epilogue's shared memory), the tail added on top.
// Cooperative schedule: both consumer warpgroups on one 128-row tile. (A 64x128 pingpong tile was
// tried for mid-size M: its producer warp spills under the 40-register cap, ptxas -v.)
//
// LayoutW: the B operands' layout in CUTLASS's terms (B is [K, N] for the GEMM). ColumnMajor: the
// forward's w [N, K] and tail_w [N, L], K contiguous (K-major). RowMajor: dx's w [N_red, K_out]
// and tail_w [L, K_out], the output dimension contiguous (MN-major; wgmma reads 16-bit B either
// way, TMA brings it into shared memory as it is in global memory).
template <class Element, class TileShape, class ClusterShape, class LayoutW_ = cutlass::layout::ColumnMajor>
struct TailGemm {
  using Acc = float;
  using LayoutX = cutlass::layout::RowMajor;     // x, tail_x: [M, K], K contiguous
  using LayoutW = LayoutW_;
  using LayoutY = cutlass::layout::RowMajor;     // y: [M, N], N contiguous
  static constexpr bool kMnMajorB = cute::is_same_v<LayoutW, cutlass::layout::RowMajor>;
  static constexpr int kAlign = 16 / sizeof(Element);  // TMA: 16-byte rows
  using Schedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  // D = acc + bias[n] (alpha = 1, beta = 0, no C operand); bias fp32, a null bias reads as 0.
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBias<Element, Acc, float, Element, Acc>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc, void, LayoutY, kAlign, Element, LayoutY, kAlign,
      EpilogueSchedule, Fusion>::CollectiveOp;

  using BaseMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutX, kAlign, Element, LayoutW, kAlign, Acc,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;
  using Mainloop = TailMainloop<BaseMainloop>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;

  static int run(const Sm90TailGemmParams& p, cudaStream_t stream) {
    using StrideA = typename Mainloop::StrideA;
    using StrideB = typename Mainloop::StrideB;
    using StrideD = typename Kernel::StrideD;
    // B's stride: (n, k, l) = (ld, 1, 0) K-major, (1, ld, 0) MN-major.
    const auto stride_b = [](int64_t ld) {
      if constexpr (kMnMajorB) return StrideB{Int<1>{}, ld, int64_t(0)};
      else return StrideB{ld, Int<1>{}, int64_t(0)};
    };
    const int M = int(p.M), N = int(p.N), K = int(p.K), L = int(p.L);
    const int K_total = Mainloop::k_total(K, L);

    typename Kernel::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = make_shape(M, N, K_total, 1);
    args.mainloop = {{static_cast<Element const*>(p.x), StrideA{p.ldx, Int<1>{}, int64_t(0)},
                      static_cast<Element const*>(p.w), stride_b(p.ldw)},
                     static_cast<Element const*>(p.tail_x), StrideA{p.ld_tail_x, Int<1>{}, int64_t(0)},
                     static_cast<Element const*>(p.tail_w), stride_b(p.ld_tail_w),
                     K, L};
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.0f;
    fusion.beta = 0.0f;
    fusion.bias_ptr = p.bias;
    args.epilogue.ptr_C = nullptr;
    args.epilogue.ptr_D = static_cast<Element*>(p.y);
    args.epilogue.dD = StrideD{p.ldy, Int<1>{}, int64_t(0)};
    args.epilogue.dC = args.epilogue.dD;
    args.hw_info.device_id = p.device;
    args.hw_info.sm_count = p.sm_count;

    if (!Kernel::can_implement(args) || Kernel::get_workspace_size(args) != 0)
      return int(cudaErrorInvalidConfiguration);
    const typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);

    // Over 48 KB of dynamic shared memory needs an opt-in, once per kernel and device.
    const void* kernel = reinterpret_cast<const void*>(&cutlass::device_kernel<Kernel>);
    constexpr int smem = Kernel::SharedStorageSize;
    static std::atomic<uint64_t> opted_in{0};
    const uint64_t bit = p.device >= 0 && p.device < 64 ? (uint64_t(1) << p.device) : 0;
    if (bit == 0 || !(opted_in.load() & bit)) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (err != cudaSuccess) return int(err);
      opted_in.fetch_or(bit);
    }
    const dim3 cluster(size<0>(ClusterShape{}), size<1>(ClusterShape{}), size<2>(ClusterShape{}));
    const cutlass::ClusterLaunchParams launch{Kernel::get_grid_shape(params), Kernel::get_block_shape(), cluster, smem,
                                              stream};
    const cutlass::Status status = cutlass::launch_kernel_on_cluster(launch, kernel, params);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return int(err);
    return status == cutlass::Status::kSuccess ? 0 : int(cudaErrorLaunchFailure);
  }
};

// The compiled tiles (lora_linear_sm90.h's Sm90Tile). 128x256x64 with a 2x1 cluster (W's tile
// multicast to the two CTAs that share it) is CUTLASS's usual large bf16 tile on H100; 128x128x64
// without a cluster doubles the tile count for mid-size problems, 128x64x64 doubles it again (M
// from 64 to a few hundred: fewer idle SMs). Reasoning, not measured (no GPU in this session);
// bench/ on an H200 is where the crossovers get measured.
using Tile128x256 = Shape<_128, _256, _64>;
using Tile128x128 = Shape<_128, _128, _64>;
using Tile128x64 = Shape<_128, _64, _64>;
using Cluster2x1 = Shape<_2, _1, _1>;
using Cluster1x1 = Shape<_1, _1, _1>;

template <class Element>
int launch(const Sm90TailGemmParams& p, int tile, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (tile) {
    case kSm90Tile128x256: return TailGemm<Element, Tile128x256, Cluster2x1>::run(p, s);
    case kSm90Tile128x128: return TailGemm<Element, Tile128x128, Cluster1x1>::run(p, s);
    case kSm90Tile128x64: return TailGemm<Element, Tile128x64, Cluster1x1>::run(p, s);
    default: return int(cudaErrorInvalidValue);
  }
}

// The backward's dx (B operands MN-major, no bias): two of the forward's tiles. dx's output is
// [M, K] with K a hidden size (>= 1024 in the models this serves) and M the training batch's
// tokens (thousands), where the 128x256 tile fills the SMs; 128x128 takes mid-size M. The 128x64
// tile is left out to keep the build short (each instantiation is about a CPU-minute of nvcc);
// a dx the plan would give 128x64 runs on 128x128 instead. Not measured (no GPU in this session).
template <class Element>
int launch_dx(const Sm90TailGemmParams& p, int tile, void* stream) {
  using MnMajor = cutlass::layout::RowMajor;
  auto s = static_cast<cudaStream_t>(stream);
  switch (tile) {
    case kSm90Tile128x256: return TailGemm<Element, Tile128x256, Cluster2x1, MnMajor>::run(p, s);
    case kSm90Tile128x128: return TailGemm<Element, Tile128x128, Cluster1x1, MnMajor>::run(p, s);
    default: return int(cudaErrorInvalidValue);
  }
}

}  // namespace sm90
}  // namespace lora_kernels
