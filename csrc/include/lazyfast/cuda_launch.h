// Host-callable entry points of the torch-free CUDA kernels. The torch glue
// (csrc/cuda/*_cuda.cpp) includes this; the kernels (csrc/cuda/*.cu) define it.
// Every function returns the launch status instead of throwing, so the .cu
// files need no torch headers and compile with plain nvcc.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lazyfast/gram.h"

namespace lazyfast {
namespace cuda {

// G = J1 J2^T; acc_t is float or double (float64 accumulation for float32 inputs).
template <typename scalar_t, typename acc_t>
cudaError_t gram(const GramParams& prm, const scalar_t* j1, const scalar_t* j2, scalar_t* g,
                 cudaStream_t stream);

}  // namespace cuda
}  // namespace lazyfast
