// Instantiates the fused LoRA linear kernels (2 dtypes x 2 tile shapes x 4 rank blocks = 16) and
// launches the one a plan names. Torch-free, so nvcc compiles it quickly.
#include <atomic>

#include "lora_linear/lora_linear.cuh"
#include "lora_linear/lora_linear_launch.h"

namespace lora_kernels {

namespace {

template <class Ty>
cudaError_t launch_typed(const LoraLinearParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_tile(plan.tile_kind, plan.rb, [&](auto cfg, auto rb) {
    using Cfg = decltype(cfg);
    constexpr int RB = decltype(rb)::value;
    auto kernel = lora_linear_fwd_kernel<Ty, Cfg, RB>;
    // Over 48 KB of dynamic shared memory needs an opt-in, once per kernel and device.
    static std::atomic<uint64_t> opted_in{0};
    int device = 0;
    err = cudaGetDevice(&device);
    if (err != cudaSuccess) return;
    const uint64_t bit = device < 64 ? (uint64_t(1) << device) : 0;
    if (bit == 0 || !(opted_in.load() & bit)) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem_bytes));
      if (err != cudaSuccess) return;
      opted_in.fetch_or(bit);
    }
    kernel<<<dim3(unsigned(plan.grid)), dim3(unsigned(plan.threads)), plan.smem_bytes, stream>>>(p);
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace

cudaError_t launch_lora_linear_fwd(const LoraLinearParams& p, bool bf16, const LaunchPlan& plan,
                                   cudaStream_t stream) {
  return bf16 ? launch_typed<Bf16>(p, plan, stream) : launch_typed<Fp16>(p, plan, stream);
}

}  // namespace lora_kernels
