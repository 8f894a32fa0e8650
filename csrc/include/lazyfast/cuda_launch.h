// Host-callable entry points of the torch-free CUDA kernels. The torch glue
// (csrc/cuda/*_cuda.cpp) includes this; the kernels (csrc/cuda/*.cu) define it.
// Every function returns the launch status instead of throwing, so the .cu
// files need no torch headers and compile with plain nvcc. Only elementwise
// steps live here: every GEMM goes through ATen (cuBLAS) in the shared drivers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lazyfast/hadamard_gram.h"
#include "lazyfast/two_layer.h"

namespace lazyfast {
namespace cuda {

// 1-D launches: kThreads1d threads per block and at most kMaxBlocks1d blocks; the
// kernels are grid-stride loops, so any number of entries is valid.
constexpr int kThreads1d = 256;
constexpr int64_t kMaxBlocks1d = int64_t(65535) * 8;

inline unsigned grid_1d(int64_t total, int threads) {
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > kMaxBlocks1d) blocks = kMaxBlocks1d;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

// Two-layer ops (two_layer_kernels.cu); T is float or double; act is an Activation code.
template <typename T>
cudaError_t two_layer_activate(const ActivateParams<T>& p, int act, cudaStream_t stream);
template <typename T>
cudaError_t gram_combine(const GramCombineParams<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t sym_trace_finalize(const SymTraceFinalizeParams<T>& p, cudaStream_t stream);

// hadamard_gram_sum (hadamard_gram_kernels.cu).
template <typename T>
cudaError_t hadamard_accumulate(const HadamardAccumulateParams<T>& p, cudaStream_t stream);
// Fills the lower triangle of a symmetric (n, n, k, k) result: out[i, j, a, b] = out[j, i, b, a].
template <typename T>
cudaError_t hadamard_mirror(T* out, int64_t n, int64_t k, cudaStream_t stream);

}  // namespace cuda
}  // namespace lazyfast
