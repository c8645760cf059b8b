// Instantiates the multi-adapter kernels -- shrink: 2 dtypes x 2 tiles, expand: 2 dtypes, fused
// linear: 2 dtypes x 2 tiles; fp32 adapters, the number of slices (grid z) and the rank (grid y of
// the shrink, chunk loop of the expand) are run-time values, not instantiations -- and launches
// the one a plan names. Torch-free, so nvcc compiles it quickly.
#include <atomic>

#include "multi_lora/multi_lora.cuh"
#include "multi_lora/multi_lora_launch.h"
#include "multi_lora/multi_lora_linear.cuh"

namespace lora_kernels {

namespace {

// Over 48 KB of dynamic shared memory needs an opt-in, once per kernel and device; the opt-in
// covers the largest launch of the kernel (fp32 adapters).
template <class Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes, std::atomic<uint64_t>& opted_in) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? (uint64_t(1) << device) : 0;
  if (bit != 0 && (opted_in.load() & bit)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err == cudaSuccess) opted_in.fetch_or(bit);
  return err;
}

template <class Ty, class Cfg>
cudaError_t shrink_typed(const MultiShrinkParams& p, const MultiLaunchPlan& plan, cudaStream_t stream) {
  static std::atomic<uint64_t> opted_in{0};
  auto kernel = multi_shrink_kernel<Ty, Cfg>;
  cudaError_t err = allow_smem(kernel, Cfg::bytes_fp32_a, opted_in);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(unsigned(plan.grid_x), unsigned(plan.grid_y), unsigned(plan.grid_z)), dim3(unsigned(plan.threads)), plan.smem_bytes,
           stream>>>(p);
  return cudaGetLastError();
}

template <class Ty>
cudaError_t shrink_tile(const MultiShrinkParams& p, const MultiLaunchPlan& plan, cudaStream_t stream) {
  if (p.item_m == kShrinkSmall) return shrink_typed<Ty, ShrinkSmall>(p, plan, stream);
  if (p.item_m == kShrinkLarge) return shrink_typed<Ty, ShrinkLarge>(p, plan, stream);
  return cudaErrorInvalidValue;
}

template <class Ty>
cudaError_t expand_typed(const MultiExpandParams& p, const MultiLaunchPlan& plan, cudaStream_t stream) {
  multi_expand_kernel<Ty><<<dim3(unsigned(plan.grid_x), unsigned(plan.grid_y), unsigned(plan.grid_z)), dim3(unsigned(plan.threads)),
                            plan.smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <class Ty, class Cfg>
cudaError_t linear_typed(const MultiLinearParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  static std::atomic<uint64_t> opted_in{0};
  auto kernel = multi_linear_kernel<Ty, Cfg>;
  cudaError_t err = allow_smem(kernel, plan.smem_bytes, opted_in);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(unsigned(plan.grid)), dim3(unsigned(plan.threads)), plan.smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <class Ty>
cudaError_t linear_tile(const MultiLinearParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  if (plan.tile_kind == kTileSmall) return linear_typed<Ty, SmallTile>(p, plan, stream);
  if (plan.tile_kind == kTileLarge) return linear_typed<Ty, LargeTile>(p, plan, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_multi_linear(const MultiLinearParams& p, bool bf16, const LaunchPlan& plan, cudaStream_t stream) {
  return bf16 ? linear_tile<Bf16>(p, plan, stream) : linear_tile<Fp16>(p, plan, stream);
}

cudaError_t launch_multi_shrink(const MultiShrinkParams& p, bool bf16, const MultiLaunchPlan& plan,
                                cudaStream_t stream) {
  return bf16 ? shrink_tile<Bf16>(p, plan, stream) : shrink_tile<Fp16>(p, plan, stream);
}

cudaError_t launch_multi_expand(const MultiExpandParams& p, bool bf16, const MultiLaunchPlan& plan,
                                cudaStream_t stream) {
  return bf16 ? expand_typed<Bf16>(p, plan, stream) : expand_typed<Fp16>(p, plan, stream);
}

}  // namespace lora_kernels
