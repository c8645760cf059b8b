// Torch-facing launchers of the multi-adapter shrink / expand / fused linear: check every tensor (each error is a
// sentence naming the argument, what was expected and what was given), fill the kernel
// parameters and launch on the current CUDA stream (graph-capturable: no synchronisation, no
// allocation), then check the launch error.
//
// Input contract (lora_kernels/cuda/multi_lora.py arranges it from the public ops' validated inputs):
// x [M, K] float16/bfloat16 with unit stride along K; 1 to 4 slices per shrink / expand launch:
// lora_a_stacks S x [L, R, K] in x's dtype or float32 (one dtype) with unit stride along K;
// lora_b_stacks S x [L, N_s, R] in y's dtype or float32 (one dtype), any strides; y [M, N_y]
// float16/bfloat16, any non-overlapping strides, offset + sum N_s <= N_y; t [S, M, R] float32
// (unit column stride, rows not overlapping, for the shrink's output; any strides as the expand's
// input); multi_lora_linear's t [M, R]; scales [L] float32 and ranks [L] int32 contiguous; work
// [I, 3] and sorted_tokens [M] int32 contiguous (AdapterIndex views).
#include "multi_lora/multi_lora.h"
#include "common/torch_checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "multi_lora/multi_lora_launch.h"

namespace lora_kernels {

namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_devices(const char* op, const char* first_name, const at::Tensor& first,
                   const std::vector<std::pair<const char*, const at::Tensor*>>& others) {
  TORCH_CHECK(first.is_cuda(), op, ": ", first_name, " is on ", first.device(),
              ", but the CUDA kernel needs CUDA tensors (use backend='torch', or backend='triton' under "
              "TRITON_INTERPRET=1, for CPU tensors)");
  for (auto& [name, ten] : others)
    TORCH_CHECK(ten->device() == first.device(), op, ": ", name, " is on ", ten->device(), " but ", first_name,
                " is on ", first.device(), "; all tensors must be on one device");
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected, const char* meaning) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, " (", meaning, "), got ",
              shape_of(t));
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must be ", expected, ", got ", t.scalar_type());
}

void check_contiguous_1d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) == 1, op, ": ", name, " must be contiguous, got stride ", t.stride(0));
}

void check_sorted_tokens(const char* op, const at::Tensor& sorted_tokens, int64_t M) {
  check_dtype(op, "sorted_tokens", sorted_tokens, at::kInt);
  check_shape(op, "sorted_tokens", sorted_tokens, {M}, "one entry per token, M");
  check_contiguous_1d(op, "sorted_tokens", sorted_tokens);
  TORCH_CHECK(M < (int64_t(1) << 31) - 1, op, ": at most 2^31 - 2 tokens are supported (int32 token ids), got ", M);
}

// The index views: work [I, 3] and sorted_tokens [M], int32, contiguous.
void check_index(const char* op, const at::Tensor& work, const at::Tensor& sorted_tokens, int64_t M, int64_t item_m) {
  check_dtype(op, "work", work, at::kInt);
  TORCH_CHECK(work.dim() == 2 && work.size(1) == 3, op, ": work must have shape [I, 3] (AdapterIndex.work), got ",
              shape_of(work));
  TORCH_CHECK(work.is_contiguous(), op, ": work must be contiguous, got strides ", work.strides());
  check_sorted_tokens(op, sorted_tokens, M);
  TORCH_CHECK(item_m == 16 || item_m == 64, op, ": item_m must be 16 or 64 (the AdapterIndex work lists), got ",
              item_m);
}

void check_ranks(const char* op, const std::optional<at::Tensor>& ranks, int64_t L) {
  if (!ranks.has_value()) return;
  check_dtype(op, "ranks", *ranks, at::kInt);
  check_shape(op, "ranks", *ranks, {L}, "one rank per adapter slot, L");
  check_contiguous_1d(op, "ranks", *ranks);
}

void check_r_max(const char* op, int64_t R) {
  TORCH_CHECK(R >= 1 && R <= kMultiMaxRank, op, ": r_max must be in [1, ", kMultiMaxRank,
              "] for the CUDA kernels, got ", R);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Every row that a 16-byte access may start at is 16-byte aligned: the base and each stride.
bool rows_aligned16(const void* base, int64_t elem_bytes, std::initializer_list<int64_t> strides) {
  if (!aligned16(base)) return false;
  for (int64_t s : strides)
    if ((s * elem_bytes) % 16 != 0) return false;
  return true;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": the kernel launch failed: ", cudaGetErrorString(err));
}

// t's rows (slice, token) as one [rows, R] matrix with unit column stride: no two rows overlap
// when the sizes > 1, sorted by stride, each stride at least the extent of what lies inside it.
bool t_rows_disjoint(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int d = 0; d < 2; ++d)
    if (t.size(d) > 1) dims.push_back({t.stride(d), t.size(d)});
  std::sort(dims.begin(), dims.end());
  int64_t extent = t.size(2);
  for (auto& [stride, size] : dims) {
    if (stride < extent) return false;
    extent = stride * size;
  }
  return true;
}

void check_slice_count(const char* op, const char* name, size_t S) {
  TORCH_CHECK(S >= 1 && S <= size_t(kMultiMaxSlices), op, ": ", name, " must hold 1 to ", kMultiMaxSlices,
              " stacks (the slices of one launch), got ", S);
}

}  // namespace

void cuda_lora_shrink(const at::Tensor& x, at::TensorList lora_a_stacks, const at::Tensor& scales,
                      const std::optional<at::Tensor>& ranks, const at::Tensor& work,
                      const at::Tensor& sorted_tokens, int64_t item_m, const at::Tensor& t, int64_t row_split) {
  constexpr const char* op = "cuda_lora_shrink";
  check_slice_count(op, "lora_a_stacks", lora_a_stacks.size());
  const int S = int(lora_a_stacks.size());
  std::vector<std::string> names;
  for (int s = 0; s < S; ++s) names.push_back("lora_a_stacks[" + std::to_string(s) + "]");
  std::vector<std::pair<const char*, const at::Tensor*>> others = {
      {"scales", &scales}, {"work", &work}, {"sorted_tokens", &sorted_tokens}, {"t", &t}};
  for (int s = 0; s < S; ++s) others.push_back({names[s].c_str(), &lora_a_stacks[s]});
  if (ranks.has_value()) others.push_back({"ranks", &*ranks});
  check_devices(op, "x", x, others);

  const auto dt = x.scalar_type();
  TORCH_CHECK(is_16bit(dt), op, ": x must be float16 or bfloat16, got ", dt,
              " (float32 inputs run on the triton or torch backend)");
  const at::Tensor& a0 = lora_a_stacks[0];
  TORCH_CHECK(a0.scalar_type() == dt || a0.scalar_type() == at::kFloat, op, ": ", names[0],
              " must have x's dtype (", dt, ") or float32, got ", a0.scalar_type());
  for (int s = 1; s < S; ++s) check_dtype(op, names[s].c_str(), lora_a_stacks[s], a0.scalar_type());
  check_dtype(op, "scales", scales, at::kFloat);
  check_dtype(op, "t", t, at::kFloat);

  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", shape_of(x));
  TORCH_CHECK(a0.dim() == 3, op, ": ", names[0], " must be 3-D [L, r_max, K], got shape ", shape_of(a0));
  const int64_t M = x.size(0), K = x.size(1), L = a0.size(0), R = a0.size(1);
  for (int s = 0; s < S; ++s)
    check_shape(op, names[s].c_str(), lora_a_stacks[s], {L, R, K}, "L, r_max, K = x.shape[1]");
  check_r_max(op, R);
  check_shape(op, "scales", scales, {L}, "one scale per adapter slot, L");
  check_contiguous_1d(op, "scales", scales);
  check_ranks(op, ranks, L);
  check_index(op, work, sorted_tokens, M, item_m);
  check_shape(op, "t", t, {S, M, R}, "S slices, M = x.shape[0], r_max");
  TORCH_CHECK(K <= 1 || x.stride(1) == 1, op, ": x must have unit stride along K, got strides ", x.strides());
  TORCH_CHECK(K <= 1 || a0.stride(2) == 1, op, ": ", names[0], " must have unit stride along K, got strides ",
              a0.strides());
  for (int s = 1; s < S; ++s)  // (the kernel reads every slice with one set of strides)
    TORCH_CHECK(lora_a_stacks[s].strides() == a0.strides(), op, ": ", names[s], " must have ", names[0],
                "'s strides ", a0.strides(), ", got ", lora_a_stacks[s].strides());
  TORCH_CHECK(R <= 1 || t.stride(2) == 1, op, ": t must have unit column stride, got strides ", t.strides());
  TORCH_CHECK(t_rows_disjoint(t), op, ": t rows must not overlap (each [r_max] row its own memory), got strides ",
              t.strides());
  if (M == 0 || work.size(0) == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const bool a_fp32 = a0.scalar_type() == at::kFloat;
  TORCH_CHECK(row_split == 1 || (row_split == kDecodeRowSplit && item_m == kShrinkSmall), op,
              ": row_split must be 1, or ", kDecodeRowSplit, " with item_m 16, got ", row_split, " (item_m ", item_m,
              ")");
  const MultiLaunchPlan plan = plan_multi_shrink(work.size(0), int(R), int(item_m), a_fp32, S, int(row_split));
  TORCH_CHECK(plan.error == nullptr, op, ": ", plan.error);

  MultiShrinkParams p{};
  p.x = static_cast<const uint16_t*>(x.data_ptr());
  p.lda_l = a0.stride(0); p.lda_r = a0.stride(1);
  p.a_vec = true;
  for (int s = 0; s < S; ++s) {
    p.a[s] = lora_a_stacks[s].data_ptr();
    p.a_vec = p.a_vec && rows_aligned16(p.a[s], a0.element_size(), {L > 1 ? p.lda_l : 0, R > 1 ? p.lda_r : 0});
  }
  p.scales = scales.data_ptr<float>();
  p.ranks = ranks.has_value() ? ranks->data_ptr<int32_t>() : nullptr;
  p.work = work.data_ptr<int32_t>();
  p.sorted_tokens = sorted_tokens.data_ptr<int32_t>();
  p.t = t.data_ptr<float>();
  p.M = M; p.K = K; p.num_items = work.size(0);
  p.R = int(R);
  p.L = int(L);
  p.S = S;
  p.bad_slot = nullptr;  // the index sanitises ids (serving.py); the clamp is the kernel's own guard
  p.item_m = int(item_m);
  p.row_split = int(row_split);
  p.ldx = x.stride(0);
  p.ldt_s = t.stride(0); p.ldt = t.stride(1);
  p.a_fp32 = a_fp32;
  p.x_vec = rows_aligned16(p.x, 2, {M > 1 ? p.ldx : 0});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_launch(op, launch_multi_shrink(p, dt == at::kBFloat16, plan, stream));
}

void cuda_lora_expand(const at::Tensor& y, const at::Tensor& t, at::TensorList lora_b_stacks,
                      const std::optional<at::Tensor>& ranks, const at::Tensor& work,
                      const at::Tensor& sorted_tokens, int64_t item_m, int64_t offset) {
  constexpr const char* op = "cuda_lora_expand";
  check_slice_count(op, "lora_b_stacks", lora_b_stacks.size());
  const int S = int(lora_b_stacks.size());
  std::vector<std::string> names;
  for (int s = 0; s < S; ++s) names.push_back("lora_b_stacks[" + std::to_string(s) + "]");
  std::vector<std::pair<const char*, const at::Tensor*>> others = {
      {"t", &t}, {"work", &work}, {"sorted_tokens", &sorted_tokens}};
  for (int s = 0; s < S; ++s) others.push_back({names[s].c_str(), &lora_b_stacks[s]});
  if (ranks.has_value()) others.push_back({"ranks", &*ranks});
  check_devices(op, "y", y, others);

  const auto dt = y.scalar_type();
  TORCH_CHECK(is_16bit(dt), op, ": y must be float16 or bfloat16, got ", dt,
              " (float32 outputs run on the triton or torch backend)");
  const at::Tensor& b0 = lora_b_stacks[0];
  TORCH_CHECK(b0.scalar_type() == dt || b0.scalar_type() == at::kFloat, op, ": ", names[0],
              " must have y's dtype (", dt, ") or float32, got ", b0.scalar_type());
  for (int s = 1; s < S; ++s) check_dtype(op, names[s].c_str(), lora_b_stacks[s], b0.scalar_type());
  check_dtype(op, "t", t, at::kFloat);

  TORCH_CHECK(y.dim() == 2, op, ": y must be 2-D [M, N_y], got shape ", shape_of(y));
  TORCH_CHECK(t.dim() == 3, op, ": t must be 3-D [S, M, r_max], got shape ", shape_of(t));
  const int64_t M = y.size(0), R = t.size(2);
  for (int s = 0; s < S; ++s)
    TORCH_CHECK(lora_b_stacks[s].dim() == 3, op, ": ", names[s], " must be 3-D [L, N_s, r_max], got shape ",
                shape_of(lora_b_stacks[s]));
  const int64_t L = b0.size(0);
  check_r_max(op, R);
  check_shape(op, "t", t, {S, M, R}, "S slices, M = y.shape[0], r_max");
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  int64_t width = offset, widest = 0;
  for (int s = 0; s < S; ++s) {
    const int64_t N = lora_b_stacks[s].size(1);
    check_shape(op, names[s].c_str(), lora_b_stacks[s], {L, N, R}, "L, N_s, r_max = t.shape[2]");
    width += N;
    widest = N > widest ? N : widest;
  }
  TORCH_CHECK(width <= y.size(1), op, ": offset + the slices' widths (", width, ") exceed y's ", y.size(1),
              " columns");
  check_ranks(op, ranks, L);
  check_index(op, work, sorted_tokens, M, item_m);
  TORCH_CHECK(at::has_internal_overlap(y) != at::MemOverlap::Yes, op,
              ": y must not overlap itself in memory (it is updated in place), got strides ", y.strides());
  others.resize(1);  // t, then the stacks
  for (int s = 0; s < S; ++s) others.push_back({names[s].c_str(), &lora_b_stacks[s]});
  for (auto& [name, ten] : others) {
    const auto status = at::get_overlap_status(y, *ten);
    TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ", name,
                " shares memory with y, which is updated in place; pass a copy");
  }
  if (M == 0 || widest == 0 || work.size(0) == 0) return;

  const c10::cuda::CUDAGuard guard(y.device());
  const MultiLaunchPlan plan = plan_multi_expand(work.size(0), widest, int(R), int(item_m), S);
  TORCH_CHECK(plan.error == nullptr, op, ": ", plan.error);

  MultiExpandParams p{};
  p.y = static_cast<uint16_t*>(y.data_ptr());
  p.t = t.data_ptr<float>();
  int64_t col = offset;
  for (int s = 0; s < S; ++s) {
    const at::Tensor& b = lora_b_stacks[s];
    MultiExpandSlice& sl = p.slices[s];
    sl.b = b.data_ptr();
    sl.N = b.size(1);
    sl.col = col;
    col += sl.N;
    sl.ldb_l = b.stride(0); sl.ldb_n = b.stride(1); sl.ldb_r = b.stride(2);
    sl.b_vec = (R <= 1 || sl.ldb_r == 1) &&
               rows_aligned16(sl.b, b.element_size(), {L > 1 ? sl.ldb_l : 0, sl.N > 1 ? sl.ldb_n : 0});
    sl.y_pairs = (sl.N <= 1 || y.stride(1) == 1) && output_pairs_aligned(p.y + sl.col, y.stride(0), M);
  }
  p.ranks = ranks.has_value() ? ranks->data_ptr<int32_t>() : nullptr;
  p.work = work.data_ptr<int32_t>();
  p.sorted_tokens = sorted_tokens.data_ptr<int32_t>();
  p.M = M; p.num_items = work.size(0);
  p.R = int(R);
  p.L = int(L);
  p.S = S;
  p.bad_slot = nullptr;
  p.item_m = int(item_m);
  p.ldy_m = y.stride(0); p.ldy_n = y.stride(1);
  p.ldt_s = t.stride(0); p.ldt_m = t.stride(1); p.ldt_r = t.stride(2);
  p.b_fp32 = b0.scalar_type() == at::kFloat;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  check_launch(op, launch_multi_expand(p, dt == at::kBFloat16, plan, stream));
}

void cuda_multi_lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_b_stack, const at::Tensor& t,
                            const std::optional<at::Tensor>& ranks, const at::Tensor& sorted_tokens,
                            const at::Tensor& sorted_adapter, const at::Tensor& slot_start, const at::Tensor& y,
                            int64_t tile_kind, int64_t tiles_per_cta) {
  constexpr const char* op = "cuda_multi_lora_linear";
  std::vector<std::pair<const char*, const at::Tensor*>> others = {
      {"weight", &weight}, {"lora_b_stack", &lora_b_stack}, {"t", &t}, {"sorted_tokens", &sorted_tokens},
      {"sorted_adapter", &sorted_adapter}, {"slot_start", &slot_start}, {"y", &y}};
  if (bias.has_value()) others.push_back({"bias", &*bias});
  if (ranks.has_value()) others.push_back({"ranks", &*ranks});
  check_devices(op, "x", x, others);

  const auto dt = x.scalar_type();
  TORCH_CHECK(is_16bit(dt), op, ": x must be float16 or bfloat16, got ", dt,
              " (float32 inputs run on the triton or torch backend)");
  check_dtype(op, "weight", weight, dt);
  check_dtype(op, "y", y, dt);
  TORCH_CHECK(lora_b_stack.scalar_type() == dt || lora_b_stack.scalar_type() == at::kFloat, op,
              ": lora_b_stack must have x's dtype (", dt, ") or float32, got ", lora_b_stack.scalar_type());
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == dt || bias->scalar_type() == at::kFloat, op, ": bias must have x's dtype (", dt,
                ") or float32, got ", bias->scalar_type());
  check_dtype(op, "t", t, at::kFloat);
  check_dtype(op, "sorted_adapter", sorted_adapter, at::kInt);
  check_dtype(op, "slot_start", slot_start, at::kInt);

  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", shape_of(x));
  TORCH_CHECK(lora_b_stack.dim() == 3, op, ": lora_b_stack must be 3-D [L, N, r_max], got shape ",
              shape_of(lora_b_stack));
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), L = lora_b_stack.size(0), R = lora_b_stack.size(2);
  check_shape(op, "weight", weight, {N, K}, "N outputs, K = x.shape[1]");
  check_shape(op, "lora_b_stack", lora_b_stack, {L, N, R}, "L, N = weight.shape[0], r_max");
  check_r_max(op, R);
  check_shape(op, "t", t, {M, R}, "M = x.shape[0], r_max (the shrink's output)");
  check_shape(op, "y", y, {M, N}, "M = x.shape[0], N = weight.shape[0]");
  if (bias.has_value()) {
    check_shape(op, "bias", *bias, {N}, "N = weight.shape[0]");
    check_contiguous_1d(op, "bias", *bias);
  }
  check_ranks(op, ranks, L);
  check_sorted_tokens(op, sorted_tokens, M);
  check_shape(op, "sorted_adapter", sorted_adapter, {M}, "one entry per token, M");
  check_contiguous_1d(op, "sorted_adapter", sorted_adapter);
  check_shape(op, "slot_start", slot_start, {L + 2}, "L + 2 segment bounds");
  check_contiguous_1d(op, "slot_start", slot_start);
  TORCH_CHECK(K <= 1 || x.stride(1) == 1, op, ": x must have unit stride along K, got strides ", x.strides());
  TORCH_CHECK(K <= 1 || weight.stride(1) == 1, op, ": weight must have unit stride along K, got strides ",
              weight.strides());
  TORCH_CHECK(N <= 1 || y.stride(1) == 1, op, ": y must have unit column stride, got strides ", y.strides());
  TORCH_CHECK(M <= 1 || y.stride(0) >= N, op, ": y rows must not overlap (y.stride(0) >= N), got strides ", y.strides());
  TORCH_CHECK(tile_kind >= 0 && tile_kind <= 2, op, ": tile_kind must be 0 (auto), 1 (small) or 2 (large), got ",
              tile_kind);
  TORCH_CHECK(tiles_per_cta >= 0, op, ": tiles_per_cta must be >= 0 (0 = auto), got ", tiles_per_cta);
  if (M == 0 || N == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const LaunchPlan plan = plan_multi_linear(M, N, int(R), int(tile_kind), int(tiles_per_cta));
  TORCH_CHECK(plan.error == nullptr, op, ": ", plan.error);

  MultiLinearParams p{};
  p.x = static_cast<const uint16_t*>(x.data_ptr());
  p.w = static_cast<const uint16_t*>(weight.data_ptr());
  p.b = lora_b_stack.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.t = t.data_ptr<float>();
  p.ranks = ranks.has_value() ? ranks->data_ptr<int32_t>() : nullptr;
  p.sorted_tokens = sorted_tokens.data_ptr<int32_t>();
  p.sorted_adapter = sorted_adapter.data_ptr<int32_t>();
  p.slot_start = slot_start.data_ptr<int32_t>();
  p.y = static_cast<uint16_t*>(y.data_ptr());
  p.M = M; p.N = N; p.K = K;
  p.L = int(L); p.R = int(R);
  p.ldx = x.stride(0); p.ldw = weight.stride(0); p.ldy = y.stride(0);
  p.ldt_m = t.stride(0); p.ldt_r = t.stride(1);
  p.ldb_l = lora_b_stack.stride(0); p.ldb_n = lora_b_stack.stride(1); p.ldb_r = lora_b_stack.stride(2);
  p.b_fp32 = lora_b_stack.scalar_type() == at::kFloat;
  p.bias_fp32 = bias.has_value() && bias->scalar_type() == at::kFloat;
  p.aligned16 = rows_16byte_aligned(p.x, p.ldx, M) && rows_16byte_aligned(p.w, p.ldw, N);
  p.y_pairs = output_pairs_aligned(p.y, p.ldy, M);
  p.tiles_per_cta = plan.tiles_per_cta;
  p.group_m = plan.group_m;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  check_launch(op, launch_multi_linear(p, dt == at::kBFloat16, plan, stream));
}

}  // namespace lora_kernels
