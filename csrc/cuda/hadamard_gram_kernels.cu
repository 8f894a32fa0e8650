// Torch-free CUDA kernels for lazyfast::hadamard_gram_sum (see lazyfast/hadamard_gram.h).
// One launch per layer: each block owns a 64x64 output tile (256 threads, 4x4 entries each),
// forms the H-Gram tile and then, per output pair (a, b), the D-Gram tile in registers from
// 16-wide shared-memory slabs, and adds scale * gd * (gamma * gh + beta) to the output. The
// per-layer n1 x n2 Grams never reach global memory (the flash-attention idea for eNTKs).
// Symmetric case: blocks below the diagonal exit at once; a mirror kernel fills them.
#include <cuda_runtime.h>

#include "lazyfast/cuda_launch.h"
#include "lazyfast/hadamard_gram.h"

namespace lazyfast {
namespace cuda {
namespace {

constexpr int kBM = 64;  // output rows per block
constexpr int kBN = 64;  // output cols per block
constexpr int kBK = 16;  // feature slab
constexpr int kTM = 4;   // rows per thread
constexpr int kTN = 4;   // cols per thread
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256

// acc[r][c] = <X1[i0 + ty*4 + r], X2[j0 + tx*4 + c]> over `len` features (rows out of range read 0).
template <typename scalar_t>
__device__ __forceinline__ void tile_gram(const scalar_t* __restrict__ x1, const scalar_t* __restrict__ x2,
                                          int64_t n1, int64_t n2, int64_t len, int64_t i0, int64_t j0,
                                          scalar_t (*as)[kBM + 1], scalar_t (*bs)[kBN + 1], scalar_t acc[kTM][kTN]) {
  const int tid = threadIdx.x;
  const int tx = tid % (kBN / kTN), ty = tid / (kBN / kTN);
#pragma unroll
  for (int r = 0; r < kTM; ++r)
#pragma unroll
    for (int c = 0; c < kTN; ++c) acc[r][c] = scalar_t(0);
  for (int64_t t0 = 0; t0 < len; t0 += kBK) {
#pragma unroll
    for (int s = 0; s < (kBM * kBK) / kThreads; ++s) {
      const int idx = tid + s * kThreads;
      const int row = idx / kBK, col = idx % kBK;
      const int64_t gi = i0 + row, gj = j0 + row, gt = t0 + col;
      as[col][row] = (gi < n1 && gt < len) ? x1[gi * len + gt] : scalar_t(0);
      bs[col][row] = (gj < n2 && gt < len) ? x2[gj * len + gt] : scalar_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kBK; ++t) {
      scalar_t a[kTM], b[kTN];
#pragma unroll
      for (int r = 0; r < kTM; ++r) a[r] = as[t][ty * kTM + r];
#pragma unroll
      for (int c = 0; c < kTN; ++c) b[c] = bs[t][tx * kTN + c];
#pragma unroll
      for (int r = 0; r < kTM; ++r)
#pragma unroll
        for (int c = 0; c < kTN; ++c) acc[r][c] += a[r] * b[c];
    }
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    hadamard_gram_layer_kernel(HadamardGramParams p, const scalar_t* __restrict__ d1, const scalar_t* __restrict__ h1,
                               const scalar_t* __restrict__ d2, const scalar_t* __restrict__ h2,
                               scalar_t* __restrict__ out) {
  if (p.symmetric && blockIdx.x < blockIdx.y) return;  // mirrored later
  __shared__ scalar_t as[kBK][kBM + 1];  // +1: the transposing stores hit distinct banks
  __shared__ scalar_t bs[kBK][kBN + 1];
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kBM, j0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int tx = threadIdx.x % (kBN / kTN), ty = threadIdx.x / (kBN / kTN);
  scalar_t mh[kTM][kTN];
  tile_gram<scalar_t>(h1, h2, p.n1, p.n2, p.v, i0, j0, as, bs, mh);
  const scalar_t gamma = static_cast<scalar_t>(p.gamma), beta = static_cast<scalar_t>(p.beta);
  const scalar_t scale = static_cast<scalar_t>(p.scale);
  const int64_t kk = p.k * p.k;
  scalar_t gd[kTM][kTN];
  for (int64_t a = 0; a < p.k; ++a) {
    for (int64_t b = 0; b < p.k; ++b) {
      tile_gram<scalar_t>(d1 + a * p.n1 * p.w, d2 + b * p.n2 * p.w, p.n1, p.n2, p.w, i0, j0, as, bs, gd);
#pragma unroll
      for (int r = 0; r < kTM; ++r) {
        const int64_t i = i0 + ty * kTM + r;
        if (i >= p.n1) continue;
#pragma unroll
        for (int c = 0; c < kTN; ++c) {
          const int64_t j = j0 + tx * kTN + c;
          if (j < p.n2) out[(i * p.n2 + j) * kk + a * p.k + b] += hadamard_term<scalar_t>(gd[r][c], mh[r][c], gamma, beta, scale);
        }
      }
    }
  }
}

// out[i, j, a, b] = out[j, i, b, a] for i > j, and the k x k block of each diagonal entry.
template <typename scalar_t>
__global__ void hadamard_gram_mirror_kernel(int64_t n, int64_t k, scalar_t* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (i >= n || j >= n || j > i) return;
  const int64_t kk = k * k;
  if (j < i) {
    for (int64_t a = 0; a < k; ++a)
      for (int64_t b = 0; b < k; ++b) out[(i * n + j) * kk + a * k + b] = out[(j * n + i) * kk + b * k + a];
  } else {
    for (int64_t a = 1; a < k; ++a)
      for (int64_t b = 0; b < a; ++b) out[(i * n + i) * kk + a * k + b] = out[(i * n + i) * kk + b * k + a];
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t hadamard_gram_layer(const HadamardGramParams& p, const scalar_t* d1, const scalar_t* h1,
                                const scalar_t* d2, const scalar_t* h2, scalar_t* out, cudaStream_t stream) {
  if (p.n1 == 0 || p.n2 == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n2, kBN)), static_cast<unsigned>(ceil_div(p.n1, kBM)));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  hadamard_gram_layer_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p, d1, h1, d2, h2, out);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t hadamard_gram_mirror(int64_t n, int64_t k, scalar_t* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>(ceil_div(n, 32)), static_cast<unsigned>(ceil_div(n, 8)));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  hadamard_gram_mirror_kernel<scalar_t><<<grid, block, 0, stream>>>(n, k, out);
  return cudaGetLastError();
}

template cudaError_t hadamard_gram_layer<float>(const HadamardGramParams&, const float*, const float*, const float*,
                                                const float*, float*, cudaStream_t);
template cudaError_t hadamard_gram_layer<double>(const HadamardGramParams&, const double*, const double*,
                                                 const double*, const double*, double*, cudaStream_t);
template cudaError_t hadamard_gram_mirror<float>(int64_t, int64_t, float*, cudaStream_t);
template cudaError_t hadamard_gram_mirror<double>(int64_t, int64_t, double*, cudaStream_t);

}  // namespace cuda
}  // namespace lazyfast
