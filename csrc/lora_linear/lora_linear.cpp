// Torch-facing launcher of the fused LoRA linear forward: checks every tensor (each error is a
// sentence naming the argument, what was expected and what was given), fills the kernel
// parameters and launches on the current CUDA stream, then checks the launch error.
//
// Input contract (the Python launcher lora_kernels/cuda/lora_linear.py arranges it): x [M, K], weight [N, K],
// lora_a [r, K] (or [2r, K] when a_split) in float16/bfloat16 with unit stride along K (any row
// stride); lora_b [N, r] in x's dtype or float32, any strides; bias [N] contiguous, x's dtype or
// float32; y [M, N] x's dtype with unit column stride; t [M, r] float32 with unit column stride.
#include "lora_linear/lora_linear.h"
#include "common/torch_checks.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <sstream>
#include <vector>

#include "lora_linear/lora_linear_launch.h"

namespace lora_kernels {

namespace {

constexpr const char* kOp = "cuda_lora_linear_fwd";

void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, const char* meaning) {
  TORCH_CHECK(t.dim() == 2, kOp, ": ", name, " must be 2-D, got ", t.dim(), "-D with shape ", shape_str(t));
  TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, kOp, ": ", name, " must have shape [", rows, ", ", cols,
              "] (", meaning, "), got ", shape_str(t));
}

void check_unit_stride_along_k(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, kOp, ": ", name,
              " must have unit stride along its last dimension, got strides ", t.strides(),
              " (lora_kernels.cuda copies such inputs with .contiguous() before calling this op)");
}

int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    int v = cache[device].load();
    if (v > 0) return v;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(sms);
  return sms;
}

}  // namespace

void cuda_lora_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                          const at::Tensor& lora_b, const std::optional<at::Tensor>& bias, double scale,
                          bool a_split, bool save_t, const at::Tensor& y, const at::Tensor& t,
                          int64_t tile_kind, int64_t tiles_per_cta) {
  // ---- device --------------------------------------------------------------------------------
  TORCH_CHECK(x.is_cuda(), kOp, ": x is on ", x.device(), ", but the CUDA kernel needs CUDA tensors "
              "(use backend='torch', or backend='triton' under TRITON_INTERPRET=1, for CPU tensors)");
  std::vector<std::pair<const char*, const at::Tensor*>> others = {
      {"weight", &weight}, {"lora_a", &lora_a}, {"lora_b", &lora_b}, {"y", &y}, {"t", &t}};
  if (bias.has_value()) others.push_back({"bias", &*bias});
  for (auto& [name, ten] : others)
    TORCH_CHECK(ten->device() == x.device(), kOp, ": ", name, " is on ", ten->device(), " but x is on ",
                x.device(), "; all tensors must be on one device");

  // ---- dtypes --------------------------------------------------------------------------------
  const auto dt = x.scalar_type();
  TORCH_CHECK(is_16bit(dt), kOp, ": x must be float16 or bfloat16, got ", dt,
              " (float32 inputs run on the triton or torch backend)");
  TORCH_CHECK(weight.scalar_type() == dt, kOp, ": weight must have x's dtype (", dt, "), got ", weight.scalar_type());
  TORCH_CHECK(lora_a.scalar_type() == dt, kOp, ": lora_a must have x's dtype (", dt, "), got ",
              lora_a.scalar_type(), " (a float32 adapter is passed as its 16-bit high and low halves with a_split=True)");
  TORCH_CHECK(lora_b.scalar_type() == dt || lora_b.scalar_type() == at::kFloat, kOp,
              ": lora_b must have x's dtype (", dt, ") or float32, got ", lora_b.scalar_type());
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == dt || bias->scalar_type() == at::kFloat, kOp,
                ": bias must have x's dtype (", dt, ") or float32, got ", bias->scalar_type());
  TORCH_CHECK(y.scalar_type() == dt, kOp, ": y must have x's dtype (", dt, "), got ", y.scalar_type());
  TORCH_CHECK(t.scalar_type() == at::kFloat, kOp, ": t must be float32, got ", t.scalar_type());

  // ---- shapes --------------------------------------------------------------------------------
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D [M, K], got shape ", shape_str(x));
  TORCH_CHECK(weight.dim() == 2, kOp, ": weight must be 2-D [N, K], got shape ", shape_str(weight));
  TORCH_CHECK(lora_b.dim() == 2, kOp, ": lora_b must be 2-D [N, r], got shape ", shape_str(lora_b));
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), rank = lora_b.size(1);
  TORCH_CHECK(rank >= 1, kOp, ": lora_b must have at least one column (rank r >= 1), got shape ", shape_str(lora_b));
  const int64_t a_rows = a_split ? 2 * rank : rank;
  check_matrix(weight, "weight", N, K, "N outputs, K = x.shape[1]");
  check_matrix(lora_a, "lora_a", a_rows, K, a_split ? "2r rows: high halves then low halves, K = x.shape[1]"
                                                     : "rank r = lora_b.shape[1], K = x.shape[1]");
  check_matrix(lora_b, "lora_b", N, rank, "N = weight.shape[0], rank r");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, kOp, ": bias must have shape [", N,
                "] (N = weight.shape[0]), got ", shape_str(*bias));
    TORCH_CHECK(N <= 1 || bias->stride(0) == 1, kOp, ": bias must be contiguous, got stride ", bias->stride(0));
  }
  check_matrix(y, "y", M, N, "M = x.shape[0], N = weight.shape[0]");
  if (save_t) check_matrix(t, "t", M, rank, "M = x.shape[0], rank r");
  TORCH_CHECK(a_rows <= 128, kOp, ": rank ", rank, a_split ? " with a float32 adapter (split into 2r = " : "",
              a_split ? std::to_string(a_rows) : std::string(), a_split ? " rows)" : "",
              " exceeds the CUDA kernel's limit of 128 (rank <= 128, or <= 64 for float32 adapters)");
  TORCH_CHECK(N > 0 || !save_t || M == 0, kOp, ": N = 0 with save_t would leave t unwritten; "
              "compute t = x @ lora_a.T directly for an empty output");
  TORCH_CHECK(tile_kind >= 0 && tile_kind <= 2, kOp, ": tile_kind must be 0 (auto), 1 (small) or 2 (large), got ", tile_kind);
  TORCH_CHECK(tiles_per_cta >= 0, kOp, ": tiles_per_cta must be >= 0 (0 = auto), got ", tiles_per_cta);

  // ---- strides -------------------------------------------------------------------------------
  check_unit_stride_along_k(x, "x");
  check_unit_stride_along_k(weight, "weight");
  check_unit_stride_along_k(lora_a, "lora_a");
  TORCH_CHECK(N <= 1 || y.stride(1) == 1, kOp, ": y must have unit column stride, got strides ", y.strides());
  TORCH_CHECK(M <= 1 || y.stride(0) >= N, kOp, ": y rows must not overlap (y.stride(0) >= N), got strides ", y.strides());
  if (save_t) {
    TORCH_CHECK(rank <= 1 || t.stride(1) == 1, kOp, ": t must have unit column stride, got strides ", t.strides());
    TORCH_CHECK(M <= 1 || t.stride(0) >= rank, kOp, ": t rows must not overlap (t.stride(0) >= r), got strides ", t.strides());
  }
  if (M == 0 || N == 0) return;

  // ---- launch --------------------------------------------------------------------------------
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.device().index();
  const LaunchPlan plan = plan_lora_linear(M, N, int(a_rows), sm_count(device), int(tile_kind), int(tiles_per_cta));
  TORCH_CHECK(plan.error == nullptr, kOp, ": ", plan.error);

  LoraLinearParams p{};
  p.x = static_cast<const uint16_t*>(x.data_ptr());
  p.w = static_cast<const uint16_t*>(weight.data_ptr());
  p.a = static_cast<const uint16_t*>(lora_a.data_ptr());
  p.b = lora_b.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.y = static_cast<uint16_t*>(y.data_ptr());
  p.t = save_t ? static_cast<float*>(t.data_ptr()) : nullptr;
  p.M = M; p.N = N; p.K = K;
  p.rank = int(rank);
  p.a_rows = int(a_rows);
  p.ldx = x.stride(0); p.ldw = weight.stride(0); p.lda = lora_a.stride(0);
  p.ldb_n = lora_b.stride(0); p.ldb_r = lora_b.stride(1);
  p.ldy = y.stride(0); p.ldt = save_t ? t.stride(0) : 0;
  p.scale = float(scale);
  p.a_split = a_split;
  p.b_fp32 = lora_b.scalar_type() == at::kFloat;
  p.bias_fp32 = bias.has_value() && bias->scalar_type() == at::kFloat;
  p.save_t = save_t;
  p.x_aligned16 = rows_16byte_aligned(p.x, p.ldx, M);
  p.w_aligned16 = rows_16byte_aligned(p.w, p.ldw, N);
  p.a_aligned16 = rows_16byte_aligned(p.a, p.lda, a_rows);
  p.y_pairs = output_pairs_aligned(p.y, p.ldy, M);
  p.tiles_per_cta = plan.tiles_per_cta;
  p.group_m = plan.group_m;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const cudaError_t err = launch_lora_linear_fwd(p, dt == at::kBFloat16, plan, stream);
  TORCH_CHECK(err == cudaSuccess, kOp, ": the kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace lora_kernels
