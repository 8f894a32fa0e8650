// Torch-free helpers shared by the CPU (host compiler) and CUDA (nvcc) builds.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LF_HD __host__ __device__ __forceinline__
#else
#define LF_HD inline
#endif

namespace lazyfast {

// Accumulator type used by the kernels: float32 inputs accumulate in float32
// unless the caller asks for float64 accumulation; float64 always in float64.
template <typename scalar_t, bool Acc64>
struct acc_type {
  using type = scalar_t;
};
template <>
struct acc_type<float, true> {
  using type = double;
};

LF_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lazyfast
