// Torch glue for the CUDA hadamard_gram_sum kernels: checks, stream, dtype dispatch, one
// launch per layer. Kept in a .cpp so hadamard_gram_kernels.cu stays torch-free.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../hadamard_gram_args.h"
#include "lazyfast/cuda_launch.h"

namespace lazyfast {
namespace {

#define LF_HG_CUDA_CHECK(expr)                                                                  \
  do {                                                                                          \
    const cudaError_t lf_err = (expr);                                                          \
    TORCH_CHECK(lf_err == cudaSuccess, "lazyfast CUDA error: ", cudaGetErrorString(lf_err));    \
  } while (0)

template <typename scalar_t>
void hadamard_gram_sum_cuda_impl(const HadamardGramFactors& f, at::ArrayRef<double> h_scale,
                                 at::ArrayRef<double> beta, at::Tensor& out, cudaStream_t stream) {
  const auto& d2 = f.symmetric ? f.d1 : f.d2;
  const auto& h2 = f.symmetric ? f.h1 : f.h2;
  for (size_t l = 0; l < f.d1.size(); ++l) {
    HadamardGramParams p;
    p.n1 = f.n1;
    p.n2 = f.n2;
    p.k = f.k;
    p.w = f.d1[l].size(2);
    p.v = f.h1[l].size(1);
    p.gamma = h_scale[l];
    p.beta = beta[l];
    p.scale = f.scale;
    p.symmetric = f.symmetric;
    LF_HG_CUDA_CHECK(cuda::hadamard_gram_layer<scalar_t>(p, f.d1[l].data_ptr<scalar_t>(), f.h1[l].data_ptr<scalar_t>(),
                                                         d2[l].data_ptr<scalar_t>(), h2[l].data_ptr<scalar_t>(),
                                                         out.data_ptr<scalar_t>(), stream));
  }
  if (f.symmetric) LF_HG_CUDA_CHECK(cuda::hadamard_gram_mirror<scalar_t>(f.n1, f.k, out.data_ptr<scalar_t>(), stream));
}

// d1[l]: (k, n1, w_l), h1[l]: (n1, v_l), d2/h2 likewise or empty -> (n1, n2) | (n1, n2, k, k)
at::Tensor hadamard_gram_sum_cuda(at::TensorList d1, at::TensorList h1, at::TensorList d2, at::TensorList h2,
                                  at::ArrayRef<double> h_scale, at::ArrayRef<double> beta, bool full) {
  TORCH_CHECK(!d1.empty(), "lazyfast: d1 must hold at least one layer");
  const c10::cuda::CUDAGuard guard(d1[0].device());
  const HadamardGramFactors f = hadamard_gram_prepare(d1, h1, d2, h2, h_scale, beta, full);
  TORCH_CHECK(f.d1[0].is_cuda(), "lazyfast: hadamard_gram_sum_cuda got tensors on ", f.d1[0].device());
  at::Tensor out = full ? at::zeros({f.n1, f.n2, f.k, f.k}, f.d1[0].options())
                        : at::zeros({f.n1, f.n2}, f.d1[0].options());
  if (f.n1 == 0 || f.n2 == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (out.scalar_type() == at::kDouble) {
    hadamard_gram_sum_cuda_impl<double>(f, h_scale, beta, out, stream);
  } else {
    hadamard_gram_sum_cuda_impl<float>(f, h_scale, beta, out, stream);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CUDA, m) { m.impl("hadamard_gram_sum", &hadamard_gram_sum_cuda); }

}  // namespace lazyfast
