// Torch-facing launcher of the in-place merge: checks every tensor (each error is a sentence naming
// the argument, what was expected and what was given), builds the kernel parameters with the
// torch-free make_merge_params (merge_plan.h) and launches on the current CUDA stream.
//
// Input contract (lora_kernels/cuda/merge.py passes the op layer's validated tensors as they are):
// weight [N, K] ([K, N] when fan_in_fan_out) float16/bfloat16/float32 with any non-overlapping
// strides; lora_a [r, K] and lora_b [N, r] in the weight's dtype or float32 (float32 for a float32
// weight), any strides; codes int8 with the weight's shape, any strides; escape_index int64 [C],
// escape_value weight's dtype [C] and status int32 [2], contiguous.
#include "merge/merge.h"
#include "common/torch_checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <limits>
#include <sstream>
#include <vector>

#include "merge/merge_launch.h"

namespace lora_kernels {

namespace {

constexpr const char* kOp = "cuda_merge_";

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t size, const char* meaning) {
  TORCH_CHECK(t.scalar_type() == dtype, kOp, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && (size < 0 || t.size(0) == size), kOp, ": ", name, " must have shape [",
              size < 0 ? std::string("C") : std::to_string(size), "] (", meaning, "), got ", shape_str(t));
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) == 1, kOp, ": ", name, " must be contiguous, got stride ", t.stride(0));
}

const at::Tensor& required(const std::optional<at::Tensor>& t, const char* name, const char* why) {
  TORCH_CHECK(t.has_value(), kOp, ": ", name, " is required ", why);
  return *t;
}

}  // namespace

void cuda_merge_(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                 bool fan_in_fan_out, int64_t mode, bool subtract, bool gated,
                 const std::optional<at::Tensor>& status, const std::optional<at::Tensor>& codes,
                 const std::optional<at::Tensor>& escape_index, const std::optional<at::Tensor>& escape_value) {
  // ---- mode and the tensors it needs ----------------------------------------------------------
  TORCH_CHECK(mode >= kMergeApply && mode <= kUnmergeExact, kOp,
              ": mode must be 0 (apply), 1 (count non-finite), 2 (merge exact) or 3 (unmerge exact), got ", mode);
  TORCH_CHECK(!subtract || mode <= kMergeCountNonfinite, kOp, ": subtract applies to modes 0 and 1 only, got mode ", mode);
  TORCH_CHECK(!gated || mode == kMergeApply || mode == kMergeExact, kOp,
              ": gated applies to modes 0 and 2 only, got mode ", mode);
  const bool needs_status = gated || mode == kMergeCountNonfinite || mode == kMergeExact;
  const bool exact = mode == kMergeExact || mode == kUnmergeExact;

  // ---- device --------------------------------------------------------------------------------
  TORCH_CHECK(weight.is_cuda(), kOp, ": weight is on ", weight.device(), ", but the CUDA kernel needs CUDA tensors "
              "(use backend='torch', or backend='triton' under TRITON_INTERPRET=1, for CPU tensors)");
  std::vector<std::pair<const char*, const at::Tensor*>> others = {{"lora_a", &lora_a}, {"lora_b", &lora_b}};
  if (needs_status) others.push_back({"status", &required(status, "status", "(int32 [2]) for this mode / gated")});
  if (exact) others.push_back({"codes", &required(codes, "codes", "(int8, the weight's shape) in the exact modes")});
  if (mode == kMergeExact) {
    others.push_back({"escape_index", &required(escape_index, "escape_index", "(int64 [C]) in mode 2")});
    others.push_back({"escape_value", &required(escape_value, "escape_value", "(the weight's dtype, [C]) in mode 2")});
  }
  for (auto& [name, ten] : others)
    TORCH_CHECK(ten->device() == weight.device(), kOp, ": ", name, " is on ", ten->device(), " but weight is on ",
                weight.device(), "; all tensors must be on one device");

  // ---- dtypes and shapes ---------------------------------------------------------------------
  const auto dt = weight.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, kOp,
              ": weight must be float16, bfloat16 or float32, got ", dt);
  TORCH_CHECK(lora_a.scalar_type() == dt || lora_a.scalar_type() == at::kFloat, kOp,
              ": lora_a must have the weight's dtype (", dt, ") or float32, got ", lora_a.scalar_type());
  TORCH_CHECK(lora_b.scalar_type() == lora_a.scalar_type(), kOp, ": lora_b must have lora_a's dtype (",
              lora_a.scalar_type(), "), got ", lora_b.scalar_type());
  TORCH_CHECK(weight.dim() == 2, kOp, ": weight must be 2-D, got shape ", shape_str(weight));
  TORCH_CHECK(lora_a.dim() == 2 && lora_b.dim() == 2, kOp, ": lora_a and lora_b must be 2-D, got shapes ",
              shape_str(lora_a), " and ", shape_str(lora_b));
  const int64_t N = fan_in_fan_out ? weight.size(1) : weight.size(0);
  const int64_t K = fan_in_fan_out ? weight.size(0) : weight.size(1);
  const int64_t rank = lora_a.size(0);
  const char* layout = fan_in_fan_out ? "weight is [K, N] (fan_in_fan_out)" : "weight is [N, K]";
  TORCH_CHECK(rank >= 1 && rank <= std::numeric_limits<int>::max(), kOp,
              ": lora_a must have between 1 and 2^31 - 1 rows (rank r), got shape ", shape_str(lora_a));
  TORCH_CHECK(lora_a.size(1) == K, kOp, ": lora_a must have shape [", rank, ", ", K, "] (rank r, K; ", layout,
              "), got ", shape_str(lora_a));
  TORCH_CHECK(lora_b.size(0) == N && lora_b.size(1) == rank, kOp, ": lora_b must have shape [", N, ", ", rank,
              "] (N; ", layout, ", r = lora_a.shape[0]), got ", shape_str(lora_b));
  TORCH_CHECK(at::has_internal_overlap(weight) != at::MemOverlap::Yes, kOp,
              ": weight has overlapping elements (strides ", weight.strides(), "); an in-place merge needs each "
              "element in its own memory");
  if (needs_status) check_vector(*status, "status", at::kInt, 2, "escape count, non-finite count");
  if (exact) {
    TORCH_CHECK(codes->scalar_type() == at::kChar, kOp, ": codes must be int8, got ", codes->scalar_type());
    TORCH_CHECK(codes->sizes() == weight.sizes(), kOp, ": codes must have the weight's shape ",
                shape_str(weight), ", got ", shape_str(*codes));
    TORCH_CHECK(mode != kMergeExact || at::has_internal_overlap(*codes) != at::MemOverlap::Yes, kOp,
                ": codes has overlapping elements (strides ", codes->strides(), ")");
  }
  if (mode == kMergeExact) {
    check_vector(*escape_index, "escape_index", at::kLong, -1, "escape table capacity C");
    check_vector(*escape_value, "escape_value", dt, escape_index->size(0), "C = escape_index.shape[0]");
  }
  if (N == 0 || K == 0) return;
  TORCH_CHECK(merge_num_tiles(N, K) <= std::numeric_limits<int>::max(), kOp, ": weight ", shape_str(weight),
              " has more than 2^31 tiles of 64 x 128 elements");

  // ---- launch --------------------------------------------------------------------------------
  const bool adapter_fp32 = lora_a.scalar_type() == at::kFloat;
  MergeArgs a{};
  a.w = weight.data_ptr();
  a.rows = weight.size(0); a.cols = weight.size(1);
  a.s0 = weight.stride(0); a.s1 = weight.stride(1);
  a.fan_in_fan_out = fan_in_fan_out;
  a.w_bytes = int(weight.element_size());
  a.a = lora_a.data_ptr(); a.a_s0 = lora_a.stride(0); a.a_s1 = lora_a.stride(1);
  a.b = lora_b.data_ptr(); a.b_s0 = lora_b.stride(0); a.b_s1 = lora_b.stride(1);
  a.rank = int(rank);
  a.adapter_fp32 = adapter_fp32;
  if (exact) {
    a.codes = static_cast<int8_t*>(codes->data_ptr());
    a.c_s0 = codes->stride(0); a.c_s1 = codes->stride(1);
  }
  if (mode == kMergeExact) {
    a.esc_index = static_cast<int64_t*>(escape_index->data_ptr());
    a.esc_value = escape_value->data_ptr();
    a.esc_capacity = escape_index->size(0);
  }
  a.status = needs_status ? static_cast<int32_t*>(status->data_ptr()) : nullptr;
  a.scale = float(scale);
  a.mode = int(mode);
  a.subtract = subtract;
  a.gated = gated;
  const MergeParams p = make_merge_params(a);

  const MergeWeight w = dt == at::kHalf ? MergeWeight::kFp16 : dt == at::kBFloat16 ? MergeWeight::kBf16 : MergeWeight::kFp32;
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.device().index()).stream();
  const cudaError_t err = launch_merge(p, w, adapter_fp32, stream);
  TORCH_CHECK(err == cudaSuccess, kOp, ": the kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace lora_kernels
