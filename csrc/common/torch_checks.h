// What the torch-facing launchers (the families' .cpp files) share in their argument checks'
// messages. Torch headers here: the kernel headers beside it in common/ stay torch-free.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <sstream>
#include <string>

namespace lora_kernels {

// "[2, 3]": a tensor's shape as error messages print it.
inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

inline bool is_16bit(at::ScalarType d) { return d == at::kHalf || d == at::kBFloat16; }

}  // namespace lora_kernels
