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

// ---- hadamard_gram_sum (structured MLP eNTK), see lazyfast/hadamard_gram.h
#include "lazyfast/hadamard_gram.h"

namespace lazyfast {
namespace cuda {

// out (n1, n2, k, k) += scale * (D1_a D2_b^T) * (gamma * H1 H2^T + beta) for one layer;
// D: (k, n, w), H: (n, v), contiguous. With p.symmetric only tiles on/above the diagonal.
template <typename scalar_t>
cudaError_t hadamard_gram_layer(const HadamardGramParams& p, const scalar_t* d1, const scalar_t* h1,
                                const scalar_t* d2, const scalar_t* h2, scalar_t* out, cudaStream_t stream);

// Fills the lower triangle of a symmetric (n, n, k, k) result: out[i, j, a, b] = out[j, i, b, a].
template <typename scalar_t>
cudaError_t hadamard_gram_mirror(int64_t n, int64_t k, scalar_t* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace lazyfast
