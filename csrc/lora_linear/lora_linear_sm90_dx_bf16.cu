// Instantiates the Hopper backward dx (lora_linear_sm90.cuh's launch_dx: the tail GEMM with its B
// operands MN-major) for bfloat16: its two tiles. Its own translation unit, beside the forward's, so
// that ninja compiles them in parallel. Compiled only for sm_90a builds with the CUTLASS headers
// (setup.py, lora_kernels/cuda/loader.py).
#include "lora_linear/lora_linear_sm90.cuh"

namespace lora_kernels {

int launch_lora_linear_sm90_dx_bf16(const Sm90TailGemmParams& p, int tile, void* stream) {
  return sm90::launch_dx<cutlass::bfloat16_t>(p, tile, stream);
}

}  // namespace lora_kernels
