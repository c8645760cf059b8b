// Instantiates the in-place merge kernel -- 5 variants: {fp16, bf16} weights x {their own dtype,
// fp32} adapters, and fp32 weights with fp32 adapters; the mode is a runtime argument, not a
// template parameter (one kernel per dtype pair keeps the build small, and merge and exact
// unmerge then run the same machine code) -- and launches the one a call needs. Torch-free.
#include <atomic>

#include "merge/merge.cuh"
#include "merge/merge_launch.h"

namespace lora_kernels {

namespace {

constexpr int kMaxDevices = 64;

int num_sms(int device) {
  static std::atomic<int> cache[kMaxDevices];
  if (device >= 0 && device < kMaxDevices) {
    const int v = cache[device].load();
    if (v > 0) return v;
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1) return 0;
  if (device >= 0 && device < kMaxDevices) cache[device].store(sms);
  return sms;
}

template <class Wt, bool kAdapterF32>
cudaError_t launch_typed(const MergeParams& p, cudaStream_t stream) {
  auto kernel = merge_kernel<Wt, kAdapterF32>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cached = device >= 0 && device < kMaxDevices;
  // Over 48 KB of dynamic shared memory (fp32 adapters at rank chunk 64) needs an opt-in, once
  // per device, for the largest request this kernel can make.
  static std::atomic<uint64_t> opted_in{0};
  const uint64_t bit = cached ? (uint64_t(1) << device) : 0;
  if (bit == 0 || !(opted_in.load() & bit)) {
    const size_t most = merge_smem_bytes(merge_pitch(kMergeRankChunk, kAdapterF32), kAdapterF32);
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(most));
    if (err != cudaSuccess) return err;
    opted_in.fetch_or(bit);
  }
  // Resident CTAs per SM for this shared-memory size (it depends on the rank chunk only: 8 sizes).
  const size_t smem = merge_smem_bytes(p.pitch, kAdapterF32);
  static std::atomic<int> resident[kMaxDevices][kMergeRankChunk / 8 + 1];
  const int slot = p.rank_chunk / 8;
  int per_sm = cached ? resident[device][slot].load() : 0;
  if (per_sm == 0) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kMergeThreads, smem);
    if (err != cudaSuccess) return err;
    if (per_sm < 1) return cudaErrorInvalidConfiguration;
    if (cached) resident[device][slot].store(per_sm);
  }
  const int sms = num_sms(device);
  if (sms < 1) return cudaErrorInvalidDevice;
  const int64_t grid = merge_grid(p.P, p.Q, sms, per_sm);
  kernel<<<dim3(unsigned(grid)), dim3(unsigned(kMergeThreads)), smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_merge(const MergeParams& p, MergeWeight weight, bool adapter_fp32, cudaStream_t stream) {
  switch (weight) {
    case MergeWeight::kFp16:
      return adapter_fp32 ? launch_typed<MergeFp16, true>(p, stream) : launch_typed<MergeFp16, false>(p, stream);
    case MergeWeight::kBf16:
      return adapter_fp32 ? launch_typed<MergeBf16, true>(p, stream) : launch_typed<MergeBf16, false>(p, stream);
    case MergeWeight::kFp32:
      return adapter_fp32 ? launch_typed<MergeFp32, true>(p, stream) : cudaErrorInvalidValue;
  }
  return cudaErrorInvalidValue;
}

}  // namespace lora_kernels
