// Helpers shared by skymoe's native CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>

namespace skymoe {

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f(c10::Float8_e4m3fn v) { return static_cast<float>(v); }

// Round to the storage dtype and back: where the PyTorch path stores an intermediate in T.
template <typename T>
inline float round_to(float v) { return to_f(static_cast<T>(v)); }

inline void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace skymoe
