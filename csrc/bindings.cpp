// The one file that registers the CUDA ops with torch (namespace lora_kernels), and the build
// record that lora_kernels/cuda/loader.py reads from the shared library's bytes before loading it.
#include <Python.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>
#include <torch/version.h>

#include "lora_linear/lora_linear.h"

#define LK_STR2(x) #x
#define LK_STR(x) LK_STR2(x)

// The torch and CUDA runtime this library was compiled against. Read as bytes (no dlopen), so a
// mismatched build is reported instead of loaded; keep the "lora_kernels_build_info:" prefix and
// the ";end" suffix in step with lora_kernels/cuda/loader.py.
extern "C" __attribute__((visibility("default"), used)) const char lora_kernels_build_info[] =
    "lora_kernels_build_info:torch=" LK_STR(TORCH_VERSION_MAJOR) "." LK_STR(TORCH_VERSION_MINOR) "." LK_STR(
        TORCH_VERSION_PATCH) ";cudart=" LK_STR(CUDART_VERSION) ";end";

TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  m.def(
      "cuda_lora_linear_fwd(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor? bias, float scale, "
      "bool a_split, bool save_t, Tensor(a!) y, Tensor(b!) t, int tile_kind=0, int tiles_per_cta=0) -> ()");
}

// Registered for CUDA and for CPU: on CPU tensors the launcher's first check raises a sentence
// that says what to use instead (rather than the dispatcher's generic "no kernel for CPU").
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("cuda_lora_linear_fwd", &lora_kernels::cuda_lora_linear_fwd); }
TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) { m.impl("cuda_lora_linear_fwd", &lora_kernels::cuda_lora_linear_fwd); }

// `import lora_kernels._C` works too (the ops register when the library loads); the module is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lora_kernels CUDA ops (torch.ops.lora_kernels)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}

// ---- in-place merge / unmerge (csrc/merge/merge.cuh) -------------------------------------------------
#include "merge/merge.h"

TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  m.def(
      "cuda_merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scale, bool fan_in_fan_out, int mode, "
      "bool subtract, bool gated, Tensor(b!)? status, Tensor(c!)? codes, Tensor(d!)? escape_index, "
      "Tensor(e!)? escape_value) -> ()");
}
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("cuda_merge_", &lora_kernels::cuda_merge_); }
TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) { m.impl("cuda_merge_", &lora_kernels::cuda_merge_); }

// ---- Multi-adapter (segmented) shrink / expand: csrc/multi_lora.{h,cpp} ---------------------
#include "multi_lora/multi_lora.h"

TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  m.def(
      "cuda_lora_shrink(Tensor x, Tensor[] lora_a_stacks, Tensor scales, Tensor? ranks, Tensor work, "
      "Tensor sorted_tokens, int item_m, Tensor(a!) t, int row_split=1) -> ()");
  m.def(
      "cuda_lora_expand(Tensor(a!) y, Tensor t, Tensor[] lora_b_stacks, Tensor? ranks, Tensor work, "
      "Tensor sorted_tokens, int item_m, int offset=0) -> ()");
}

// CUDA and CPU, as cuda_lora_linear_fwd: CPU tensors get the launcher's sentence.
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("cuda_lora_shrink", &lora_kernels::cuda_lora_shrink);
  m.impl("cuda_lora_expand", &lora_kernels::cuda_lora_expand);
}
TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("cuda_lora_shrink", &lora_kernels::cuda_lora_shrink);
  m.impl("cuda_lora_expand", &lora_kernels::cuda_lora_expand);
}

// ---- Multi-adapter fused linear (base GEMM + per-segment expand epilogue): csrc/multi_lora.{h,cpp}
TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  m.def(
      "cuda_multi_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_b_stack, Tensor t, Tensor? ranks, "
      "Tensor sorted_tokens, Tensor sorted_adapter, Tensor slot_start, Tensor(a!) y, int tile_kind=0, "
      "int tiles_per_cta=0) -> ()");
}
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) { m.impl("cuda_multi_lora_linear", &lora_kernels::cuda_multi_lora_linear); }
TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) { m.impl("cuda_multi_lora_linear", &lora_kernels::cuda_multi_lora_linear); }

// ---- Hopper fused LoRA linear (CUTLASS 4 TMA + wgmma, LoRA as extra K blocks): csrc/lora_linear_sm90.{h,cpp}
#include "lora_linear/lora_linear_sm90_op.h"

TORCH_LIBRARY_FRAGMENT(lora_kernels, m) {
  m.def(
      "cuda_lora_linear_sm90_fwd(Tensor x, Tensor weight, Tensor tail_x, Tensor tail_w, Tensor? bias, "
      "Tensor(a!) y, int tile=0) -> ()");
  // Whether this build carries the sm90 kernels (CUTLASS headers and a 9.0a target at build time).
  m.def("cuda_lora_linear_sm90_built() -> bool", &lora_kernels::cuda_lora_linear_sm90_built);
  // The backward's dx on the same kernel, B operands MN-major: dx = dy @ weight + tail_x @ tail_w.
  m.def(
      "cuda_lora_linear_sm90_dx(Tensor dy, Tensor weight, Tensor tail_x, Tensor tail_w, Tensor(a!) dx, "
      "int tile=0) -> ()");
  m.def("cuda_lora_linear_sm90_dx_built() -> bool", &lora_kernels::cuda_lora_linear_sm90_dx_built);
}
TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("cuda_lora_linear_sm90_fwd", &lora_kernels::cuda_lora_linear_sm90_fwd);
  m.impl("cuda_lora_linear_sm90_dx", &lora_kernels::cuda_lora_linear_sm90_dx);
}
TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
  m.impl("cuda_lora_linear_sm90_fwd", &lora_kernels::cuda_lora_linear_sm90_fwd);
  m.impl("cuda_lora_linear_sm90_dx", &lora_kernels::cuda_lora_linear_sm90_dx);
}
