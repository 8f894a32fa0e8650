// Torch-free CUDA kernels for the generic Gram op. Compiled by setup.py into the
// extension and, standalone, by CMakeLists.txt as a compile check on GPU-less CI.
#include <cuda_runtime.h>

#include "lazyfast/cuda_launch.h"

namespace lazyfast {
namespace cuda {
namespace {

constexpr int kTile = 16;  // 16x16 output tile per block, P streamed through shared memory

// G[i, j] = sum_p J1[i, p] * J2[j, p]. Each thread owns one output element and
// accumulates in acc_t; both operands are staged in shared memory per P-slab.
template <typename scalar_t, typename acc_t>
__global__ void gram_kernel(GramParams prm, const scalar_t* __restrict__ j1,
                            const scalar_t* __restrict__ j2, scalar_t* __restrict__ g) {
  __shared__ acc_t sa[kTile][kTile + 1];
  __shared__ acc_t sb[kTile][kTile + 1];
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t jb = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.y;  // row of J2 this thread loads
  acc_t acc = acc_t(0);
  for (int64_t p0 = 0; p0 < prm.p; p0 += kTile) {
    const int64_t p = p0 + threadIdx.x;
    sa[threadIdx.y][threadIdx.x] = (i < prm.n1 && p < prm.p) ? static_cast<acc_t>(j1[i * prm.p + p]) : acc_t(0);
    sb[threadIdx.y][threadIdx.x] = (jb < prm.n2 && p < prm.p) ? static_cast<acc_t>(j2[jb * prm.p + p]) : acc_t(0);
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kTile; ++t) acc += sa[threadIdx.y][t] * sb[threadIdx.x][t];
    __syncthreads();
  }
  if (i < prm.n1 && j < prm.n2) g[i * prm.n2 + j] = static_cast<scalar_t>(acc);
}

}  // namespace

template <typename scalar_t, typename acc_t>
cudaError_t gram(const GramParams& prm, const scalar_t* j1, const scalar_t* j2, scalar_t* g,
                 cudaStream_t stream) {
  if (prm.n1 == 0 || prm.n2 == 0) return cudaSuccess;
  const dim3 block(kTile, kTile);
  const dim3 grid(static_cast<unsigned>(ceil_div(prm.n2, kTile)), static_cast<unsigned>(ceil_div(prm.n1, kTile)));
  gram_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(prm, j1, j2, g);
  return cudaGetLastError();
}

template cudaError_t gram<float, float>(const GramParams&, const float*, const float*, float*, cudaStream_t);
template cudaError_t gram<float, double>(const GramParams&, const float*, const float*, float*, cudaStream_t);
template cudaError_t gram<double, double>(const GramParams&, const double*, const double*, double*, cudaStream_t);

}  // namespace cuda
}  // namespace lazyfast
