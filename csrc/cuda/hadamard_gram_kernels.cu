// Torch-free CUDA kernels of lazyfast::hadamard_gram_sum: only the elementwise steps (the
// Hadamard accumulate and the symmetric mirror). The two Gram tiles of each block come from
// cuBLAS through ATen in the shared driver (csrc/hadamard_gram_aten.h); the math is the
// host+device rule of lazyfast/hadamard_gram.h. Grid-stride loops: any size fits the grid.
#include <cuda_runtime.h>

#include "lazyfast/cuda_launch.h"
#include "lazyfast/hadamard_gram.h"

namespace lazyfast {
namespace cuda {
namespace {

template <typename T>
__global__ void hadamard_accumulate_kernel(HadamardAccumulateParams<T> p) {
  const int64_t total = p.ti * p.tj;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    hadamard_accumulate_entry<T>(p, e / p.tj, e % p.tj);
  }
}

template <typename T>
__global__ void hadamard_mirror_kernel(T* out, int64_t n, int64_t k) {
  const int64_t kk = k * k, total = n * n * kk;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ab = e % kk, ij = e / kk;
    hadamard_mirror_entry<T>(out, n, k, ij / n, ij % n, ab / k, ab % k);
  }
}

}  // namespace

template <typename T>
cudaError_t hadamard_accumulate(const HadamardAccumulateParams<T>& p, cudaStream_t stream) {
  if (p.ti == 0 || p.tj == 0) return cudaSuccess;
  hadamard_accumulate_kernel<T><<<grid_1d(p.ti * p.tj, kThreads1d), kThreads1d, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t hadamard_mirror(T* out, int64_t n, int64_t k, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  hadamard_mirror_kernel<T><<<grid_1d(n * n * k * k, kThreads1d), kThreads1d, 0, stream>>>(out, n, k);
  return cudaGetLastError();
}

template cudaError_t hadamard_accumulate<float>(const HadamardAccumulateParams<float>&, cudaStream_t);
template cudaError_t hadamard_accumulate<double>(const HadamardAccumulateParams<double>&, cudaStream_t);
template cudaError_t hadamard_mirror<float>(float*, int64_t, int64_t, cudaStream_t);
template cudaError_t hadamard_mirror<double>(double*, int64_t, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace lazyfast
