// Torch-free CUDA kernels of the two-layer ops: only the elementwise steps. The GEMMs
// run through ATen (cuBLAS) in the shared drivers of csrc/two_layer_aten.h; the math of
// each step is the host+device rule in lazyfast/two_layer.h, unit-tested on the CPU.
// Every kernel is a 1-D grid-stride loop over its entries: any size fits the grid.
#include <cuda_runtime.h>

#include "lazyfast/activations.h"
#include "lazyfast/cuda_launch.h"
#include "lazyfast/two_layer.h"

namespace lazyfast {
namespace cuda {
namespace {

template <typename T, int kAct>
__global__ void two_layer_activate_kernel(ActivateParams<T> p) {
  const int64_t total = p.rows * p.cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    activate_entry<T, kAct>(p, e / p.cols, e % p.cols);
  }
}

template <typename T>
__global__ void gram_combine_kernel(GramCombineParams<T> p) {
  const int64_t total = p.rows * p.cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    gram_combine_entry<T>(p, e / p.cols, e % p.cols);
  }
}

template <typename T>
__global__ void sym_trace_finalize_kernel(SymTraceFinalizeParams<T> p) {
  const int64_t w = p.n - p.i0, total = p.ib * w;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    sym_trace_finalize_entry<T>(p, e / w, e % w);
  }
}

template <typename T, int kAct>
cudaError_t launch_activate(const ActivateParams<T>& p, cudaStream_t stream) {
  two_layer_activate_kernel<T, kAct><<<grid_1d(p.rows * p.cols, kThreads1d), kThreads1d, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t two_layer_activate(const ActivateParams<T>& p, int act, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  if (p.phi_colsum != nullptr || p.deriv_colsum != nullptr) return cudaErrorInvalidValue;  // host-only
  switch (act) {
    case 0: return launch_activate<T, 0>(p, stream);
    case 1: return launch_activate<T, 1>(p, stream);
    case 2: return launch_activate<T, 2>(p, stream);
    case 3: return launch_activate<T, 3>(p, stream);
    case 4: return launch_activate<T, 4>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t gram_combine(const GramCombineParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  gram_combine_kernel<T><<<grid_1d(p.rows * p.cols, kThreads1d), kThreads1d, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t sym_trace_finalize(const SymTraceFinalizeParams<T>& p, cudaStream_t stream) {
  if (p.ib == 0 || p.n - p.i0 == 0) return cudaSuccess;
  sym_trace_finalize_kernel<T><<<grid_1d(p.ib * (p.n - p.i0), kThreads1d), kThreads1d, 0, stream>>>(p);
  return cudaGetLastError();
}

#define LF_INSTANTIATE(T)                                                                 \
  template cudaError_t two_layer_activate<T>(const ActivateParams<T>&, int, cudaStream_t); \
  template cudaError_t gram_combine<T>(const GramCombineParams<T>&, cudaStream_t);        \
  template cudaError_t sym_trace_finalize<T>(const SymTraceFinalizeParams<T>&, cudaStream_t);
LF_INSTANTIATE(float)
LF_INSTANTIATE(double)
#undef LF_INSTANTIATE

}  // namespace cuda
}  // namespace lazyfast
