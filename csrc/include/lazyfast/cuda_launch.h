// Host-callable entry points of the torch-free CUDA kernels. The torch glue
// (csrc/cuda/*_cuda.cpp) includes this; the kernels (csrc/cuda/*.cu) define it.
// Every function returns the launch status instead of throwing, so the .cu
// files need no torch headers and compile with plain nvcc.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "lazyfast/gram.h"
#include "lazyfast/two_layer.h"

namespace lazyfast {
namespace cuda {

// G = J1 J2^T; acc_t is float or double (float64 accumulation for float32 inputs).
template <typename scalar_t, typename acc_t>
cudaError_t gram(const GramParams& prm, const scalar_t* j1, const scalar_t* j2, scalar_t* g,
                 cudaStream_t stream);

// Two-layer ops (two_layer_kernels.cu); T is float or double; act is an Activation code.
template <typename T>
cudaError_t two_layer_activate(const ActivateParams<T>& p, int act, cudaStream_t stream);
template <typename T>
cudaError_t two_layer_features(const TwoLayerFeatureParams<T>& p, int act, cudaStream_t stream);
template <typename T>
cudaError_t two_layer_gram_chunk(const TwoLayerGramParams<T>& p, cudaStream_t stream);
// Output rows per Gram tile (the chunk length is rounded to a multiple of it by the glue).
template <typename T>
int64_t two_layer_gram_tile_rows();
// out (n, n) [k = 1] or (n, n, k, k): lower triangle := mirror of the upper one.
template <typename T>
cudaError_t two_layer_mirror(T* out, int64_t n, int64_t k, cudaStream_t stream);

}  // namespace cuda
}  // namespace lazyfast
