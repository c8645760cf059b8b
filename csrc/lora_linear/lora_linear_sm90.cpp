// Torch-facing launchers of the Hopper fused LoRA linear and of its backward's dx
// (lora_linear_sm90.cuh): checks every
// tensor (each error a sentence naming the argument), checks that the device is an sm_90 one
// (its capability read once per device, at the first launch there), fills the parameters and
// launches on the current CUDA stream. Compiled into every build; the kernels themselves only
// into builds with the CUTLASS headers and a 9.0a target (lora_linear_sm90.h's weak symbols).
//
// Input contract (lora_kernels/cuda/lora_linear.py arranges it): x [M, K], weight [N, K],
// tail_x [M, L], tail_w [N, L], y [M, N], all one 16-bit dtype, unit stride along the last
// dimension, 16-byte aligned starts and row strides (TMA); bias [N] float32 contiguous or None.
// dx: dy [M, N], weight [N, K], tail_x [M, L], tail_w [L, K], dx [M, K], the same rules.
#include "lora_linear/lora_linear_sm90.h"
#include "common/torch_checks.h"
#include "lora_linear/lora_linear_sm90_op.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <utility>

namespace lora_kernels {

namespace {

constexpr const char* kOp = "cuda_lora_linear_sm90_fwd";
constexpr const char* kOpDx = "cuda_lora_linear_sm90_dx";

// The device's compute capability as major * 10 + minor, read once per device.
int capability(int device) {
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    const int v = cache[device].load();
    if (v > 0) return v;
  }
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (device >= 0 && device < 64) cache[device].store(major * 10 + minor);
  return major * 10 + minor;
}

int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    const int v = cache[device].load();
    if (v > 0) return v;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(sms);
  return sms;
}

void check_operand(const char* op, const at::Tensor& t, const char* name, int64_t rows, int64_t cols,
                   const char* meaning, at::ScalarType dt, const char* first = "x") {
  TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must have ", first, "'s dtype (", dt, "), got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must have shape [", rows,
              ", ", cols, "] (", meaning, "), got ", shape_str(t));
  TORCH_CHECK(cols <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have unit stride along its last dimension, got strides ", t.strides());
  TORCH_CHECK(rows <= 1 || t.stride(0) >= cols, op, ": ", name, " rows must not overlap, got strides ", t.strides());
  TORCH_CHECK(tma_compatible(t.data_ptr(), rows <= 1 ? 8 : t.stride(0), 2), op, ": ", name,
              " must start on a 16-byte boundary with a row stride that is a multiple of 8 elements (TMA), "
              "got strides ", t.strides(), " and address offset ", reinterpret_cast<uintptr_t>(t.data_ptr()) % 16,
              " mod 16 (lora_kernels.cuda sends such inputs to the sm_80 kernel or the Triton backward)");
}

void check_same_device(const char* op, const at::Tensor& first, const char* first_name,
                       std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  for (auto [name, ten] : others)
    TORCH_CHECK(ten->device() == first.device(), op, ": ", name, " is on ", ten->device(), " but ", first_name,
                " is on ", first.device(), "; all tensors must be on one device");
}

// The device must be an sm_90 one (H100/H200); read once per device.
int checked_hopper_device(const char* op, const at::Tensor& t) {
  const int device = t.device().index();
  const int cc = capability(device);
  TORCH_CHECK(cc == 90, op, ": the kernel needs an sm_90 GPU (H100/H200: wgmma and TMA), but ", t.device(),
              " has compute capability ", cc / 10, ".", cc % 10);
  return device;
}

}  // namespace

bool cuda_lora_linear_sm90_built() {
  return launch_lora_linear_sm90_bf16 != nullptr && launch_lora_linear_sm90_fp16 != nullptr;
}

bool cuda_lora_linear_sm90_dx_built() {
  return launch_lora_linear_sm90_dx_bf16 != nullptr && launch_lora_linear_sm90_dx_fp16 != nullptr;
}

void cuda_lora_linear_sm90_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& tail_x,
                               const at::Tensor& tail_w, const std::optional<at::Tensor>& bias, const at::Tensor& y,
                               int64_t tile) {
  TORCH_CHECK(x.is_cuda(), kOp, ": x is on ", x.device(), ", but the CUDA kernel needs CUDA tensors "
              "(use backend='torch', or backend='triton' under TRITON_INTERPRET=1, for CPU tensors)");
  check_same_device(kOp, x, "x", {{"weight", &weight}, {"tail_x", &tail_x}, {"tail_w", &tail_w}, {"y", &y}});
  if (bias.has_value())
    TORCH_CHECK(bias->device() == x.device(), kOp, ": bias is on ", bias->device(), " but x is on ", x.device(),
                "; all tensors must be on one device");

  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, kOp, ": x must be float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D [M, K], got shape ", shape_str(x));
  TORCH_CHECK(weight.dim() == 2, kOp, ": weight must be 2-D [N, K], got shape ", shape_str(weight));
  TORCH_CHECK(tail_x.dim() == 2, kOp, ": tail_x must be 2-D [M, L], got shape ", shape_str(tail_x));
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), L = tail_x.size(1);
  TORCH_CHECK(K >= 1 && L >= 1, kOp, ": K = x.shape[1] and L = tail_x.shape[1] must be >= 1, got K = ", K,
              ", L = ", L);
  TORCH_CHECK(M < (int64_t(1) << 31) && N < (int64_t(1) << 31) && K + L + 64 < (int64_t(1) << 31), kOp,
              ": M, N and K + L must be below 2^31, got M = ", M, ", N = ", N, ", K + L = ", K + L);
  check_operand(kOp, x, "x", M, K, "M rows, K", dt);
  check_operand(kOp, weight, "weight", N, K, "N outputs, K = x.shape[1]", dt);
  check_operand(kOp, tail_x, "tail_x", M, L, "M = x.shape[0], L tail columns", dt);
  check_operand(kOp, tail_w, "tail_w", N, L, "N = weight.shape[0], L = tail_x.shape[1]", dt);
  check_operand(kOp, y, "y", M, N, "M = x.shape[0], N = weight.shape[0]", dt);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat, kOp, ": bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, kOp, ": bias must have shape [", N,
                "] (N = weight.shape[0]), got ", shape_str(*bias));
    TORCH_CHECK(N <= 1 || bias->stride(0) == 1, kOp, ": bias must be contiguous, got stride ", bias->stride(0));
    TORCH_CHECK(reinterpret_cast<uintptr_t>(bias->data_ptr()) % 16 == 0, kOp,
                ": bias must start on a 16-byte boundary (vector loads in the epilogue)");
  }
  TORCH_CHECK(tile >= 0 && tile < kSm90TileCount, kOp, ": tile must be 0 (128x256), 1 (128x128) or 2 (128x64), got ",
              tile);
  TORCH_CHECK(cuda_lora_linear_sm90_built(), kOp,
              ": this build of lora_kernels._C has no sm90 kernels (it was compiled without the CUTLASS "
              "headers of the nvidia-cutlass package, or without a 9.0a target in TORCH_CUDA_ARCH_LIST)");

  const c10::cuda::CUDAGuard guard(x.device());
  const int device = checked_hopper_device(kOp, x);
  if (M == 0 || N == 0) return;

  Sm90TailGemmParams p{};
  p.x = x.data_ptr();
  p.w = weight.data_ptr();
  p.tail_x = tail_x.data_ptr();
  p.tail_w = tail_w.data_ptr();
  p.bias = bias.has_value() ? static_cast<const float*>(bias->data_ptr()) : nullptr;
  p.y = y.data_ptr();
  p.M = M; p.N = N; p.K = K; p.L = L;
  p.ldx = M <= 1 ? K : x.stride(0);
  p.ldw = N <= 1 ? K : weight.stride(0);
  p.ld_tail_x = M <= 1 ? L : tail_x.stride(0);
  p.ld_tail_w = N <= 1 ? L : tail_w.stride(0);
  p.ldy = M <= 1 ? N : y.stride(0);
  p.device = device;
  p.sm_count = sm_count(device);
  // A single row's stride is free in torch; TMA wants a 16-byte multiple: round it up.
  for (int64_t* ld : {&p.ldx, &p.ldw, &p.ld_tail_x, &p.ld_tail_w, &p.ldy}) *ld = (*ld + 7) / 8 * 8;

  void* stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int err = dt == at::kBFloat16 ? launch_lora_linear_sm90_bf16(p, int(tile), stream)
                                      : launch_lora_linear_sm90_fp16(p, int(tile), stream);
  TORCH_CHECK(err == 0, kOp, ": the kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void cuda_lora_linear_sm90_dx(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& tail_x,
                              const at::Tensor& tail_w, const at::Tensor& dx, int64_t tile) {
  TORCH_CHECK(dy.is_cuda(), kOpDx, ": dy is on ", dy.device(), ", but the CUDA kernel needs CUDA tensors");
  check_same_device(kOpDx, dy, "dy", {{"weight", &weight}, {"tail_x", &tail_x}, {"tail_w", &tail_w}, {"dx", &dx}});
  const auto dt = dy.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, kOpDx, ": dy must be float16 or bfloat16, got ", dt);
  TORCH_CHECK(dy.dim() == 2, kOpDx, ": dy must be 2-D [M, N], got shape ", shape_str(dy));
  TORCH_CHECK(weight.dim() == 2, kOpDx, ": weight must be 2-D [N, K], got shape ", shape_str(weight));
  TORCH_CHECK(tail_x.dim() == 2, kOpDx, ": tail_x must be 2-D [M, L], got shape ", shape_str(tail_x));
  const int64_t M = dy.size(0), N = dy.size(1), K = weight.size(1), L = tail_x.size(1);
  TORCH_CHECK(N >= 1 && L >= 1, kOpDx, ": N = dy.shape[1] and L = tail_x.shape[1] must be >= 1, got N = ", N,
              ", L = ", L);
  TORCH_CHECK(M < (int64_t(1) << 31) && K < (int64_t(1) << 31) && N + L + 64 < (int64_t(1) << 31), kOpDx,
              ": M, K and N + L must be below 2^31, got M = ", M, ", K = ", K, ", N + L = ", N + L);
  check_operand(kOpDx, dy, "dy", M, N, "M rows, N outputs of the forward", dt, "dy");
  check_operand(kOpDx, weight, "weight", N, K, "N = dy.shape[1], K inputs", dt, "dy");
  check_operand(kOpDx, tail_x, "tail_x", M, L, "M = dy.shape[0], L tail columns", dt, "dy");
  check_operand(kOpDx, tail_w, "tail_w", L, K, "L = tail_x.shape[1], K = weight.shape[1]", dt, "dy");
  check_operand(kOpDx, dx, "dx", M, K, "M = dy.shape[0], K = weight.shape[1]", dt, "dy");
  TORCH_CHECK(tile == kSm90Tile128x256 || tile == kSm90Tile128x128, kOpDx,
              ": tile must be 0 (128x256) or 1 (128x128), the tiles compiled for dx, got ", tile);
  TORCH_CHECK(cuda_lora_linear_sm90_dx_built(), kOpDx,
              ": this build of lora_kernels._C has no sm90 dx kernels (it was compiled without the CUTLASS "
              "headers of the nvidia-cutlass package, or without a 9.0a target in TORCH_CUDA_ARCH_LIST)");

  const c10::cuda::CUDAGuard guard(dy.device());
  const int device = checked_hopper_device(kOpDx, dy);
  if (M == 0 || K == 0) return;

  // The kernel's GEMM: output [M, K] (its "N"), reduction over N (its "K"); B operands MN-major.
  Sm90TailGemmParams p{};
  p.x = dy.data_ptr();
  p.w = weight.data_ptr();
  p.tail_x = tail_x.data_ptr();
  p.tail_w = tail_w.data_ptr();
  p.bias = nullptr;
  p.y = dx.data_ptr();
  p.M = M; p.N = K; p.K = N; p.L = L;
  p.ldx = M <= 1 ? N : dy.stride(0);
  p.ldw = N <= 1 ? K : weight.stride(0);
  p.ld_tail_x = M <= 1 ? L : tail_x.stride(0);
  p.ld_tail_w = L <= 1 ? K : tail_w.stride(0);
  p.ldy = M <= 1 ? K : dx.stride(0);
  p.device = device;
  p.sm_count = sm_count(device);
  for (int64_t* ld : {&p.ldx, &p.ldw, &p.ld_tail_x, &p.ld_tail_w, &p.ldy}) *ld = (*ld + 7) / 8 * 8;

  void* stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int err = dt == at::kBFloat16 ? launch_lora_linear_sm90_dx_bf16(p, int(tile), stream)
                                      : launch_lora_linear_sm90_dx_fp16(p, int(tile), stream);
  TORCH_CHECK(err == 0, kOpDx, ": the kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace lora_kernels
