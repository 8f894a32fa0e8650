// Torch glue for the CUDA Gram kernel: checks, stream, dtype dispatch.
// Kept in a .cpp (host compiler) so the kernels in gram_kernels.cu stay torch-free.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "lazyfast/cuda_launch.h"

namespace lazyfast {
namespace {

#define LF_CUDA_CHECK(...) /* variadic: template arguments carry commas */            \
  do {                                                                                  \
    const cudaError_t lf_err = (__VA_ARGS__);                                                \
    TORCH_CHECK(lf_err == cudaSuccess, "lazyfast CUDA error: ", cudaGetErrorString(lf_err)); \
  } while (0)

// j1: (n1, P), j2: (n2, P) -> (n1, n2)
at::Tensor gram_cuda(const at::Tensor& j1, const at::Tensor& j2, bool accumulate_f64) {
  LF_CHECK_DIM(j1, 2, "j1");
  LF_CHECK_DIM(j2, 2, "j2");
  LF_CHECK_FLOAT(j1, "j1");
  LF_CHECK_SAME_DTYPE(j1, j2, "j1", "j2");
  LF_CHECK_SAME_DEVICE(j1, j2, "j1", "j2");
  TORCH_CHECK(j1.size(1) == j2.size(1), "lazyfast: j2 has ", j2.size(1), " columns but j1 has ", j1.size(1));
  const c10::cuda::CUDAGuard guard(j1.device());
  const at::Tensor a = j1.contiguous(), b = j2.contiguous();
  at::Tensor g = at::empty({a.size(0), b.size(0)}, a.options());
  GramParams prm;
  prm.n1 = a.size(0);
  prm.n2 = b.size(0);
  prm.p = a.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (a.scalar_type() == at::kDouble) {
    LF_CUDA_CHECK(cuda::gram<double, double>(prm, a.data_ptr<double>(), b.data_ptr<double>(), g.data_ptr<double>(), stream));
  } else if (accumulate_f64) {
    LF_CUDA_CHECK(cuda::gram<float, double>(prm, a.data_ptr<float>(), b.data_ptr<float>(), g.data_ptr<float>(), stream));
  } else {
    LF_CUDA_CHECK(cuda::gram<float, float>(prm, a.data_ptr<float>(), b.data_ptr<float>(), g.data_ptr<float>(), stream));
  }
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CUDA, m) { m.impl("gram", &gram_cuda); }

}  // namespace lazyfast
