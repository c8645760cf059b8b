// Instantiates the Hopper fused LoRA linear (lora_linear_sm90.cuh) for float16: its three tiles.
// Compiled only for sm_90a builds with the CUTLASS headers (setup.py, lora_kernels/cuda/loader.py).
#include "lora_linear/lora_linear_sm90.cuh"

namespace lora_kernels {

int launch_lora_linear_sm90_fp16(const Sm90TailGemmParams& p, int tile, void* stream) {
  return sm90::launch<cutlass::half_t>(p, tile, stream);
}

}  // namespace lora_kernels
