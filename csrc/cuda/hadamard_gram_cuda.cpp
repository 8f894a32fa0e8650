// CUDA backend of lazyfast::hadamard_gram_sum: the shared driver of csrc/hadamard_gram_aten.h
// (cuBLAS GEMMs through ATen) with the accumulate and mirror kernels of
// hadamard_gram_kernels.cu, under the device guard and the lazyfast matmul precision.
// Kept in a .cpp so the kernels stay torch-free.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../hadamard_gram_aten.h"
#include "../precision.h"
#include "cuda_check.h"
#include "lazyfast/cuda_launch.h"

namespace lazyfast {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename T>
void accumulate_cuda_typed(at::Tensor& out, int64_t offset, int64_t n2, int64_t kk, const at::Tensor& gd,
                           const at::Tensor& gh, int64_t ti, int64_t tj, double gamma, double beta, double scale) {
  HadamardAccumulateParams<T> p;
  p.out = out.data_ptr<T>() + offset;
  p.n2 = n2;
  p.kk = kk;
  p.gd = gd.data_ptr<T>();
  p.gh = gh.data_ptr<T>();
  p.ldg = tj;
  p.ti = ti;
  p.tj = tj;
  p.gamma = static_cast<T>(gamma);
  p.beta = static_cast<T>(beta);
  p.scale = static_cast<T>(scale);
  LF_CUDA_CHECK(cuda::hadamard_accumulate<T>(p, current_stream()));
}

void accumulate_cuda(at::Tensor& out, int64_t offset, int64_t n2, int64_t kk, const at::Tensor& gd,
                     const at::Tensor& gh, int64_t ti, int64_t tj, double gamma, double beta, double scale) {
  LF_DISPATCH_FLOAT(out, "out (Hadamard accumulate)", "hadamard_accumulate_cuda", [&] {
    accumulate_cuda_typed<scalar_t>(out, offset, n2, kk, gd, gh, ti, tj, gamma, beta, scale);
  });
}

void mirror_cuda(at::Tensor& out, int64_t n, int64_t k) {
  LF_DISPATCH_FLOAT(out, "out (Hadamard mirror)", "hadamard_mirror_cuda", [&] {
    LF_CUDA_CHECK(cuda::hadamard_mirror<scalar_t>(out.data_ptr<scalar_t>(), n, k, current_stream()));
  });
}

// d1[l]: (k, n1, w_l), h1[l]: (n1, v_l), d2/h2 likewise or empty -> (n1, n2) | (n1, n2, k, k)
at::Tensor hadamard_gram_sum_cuda(at::TensorList d1, at::TensorList h1, at::TensorList d2, at::TensorList h2,
                                  at::ArrayRef<double> h_scale, at::ArrayRef<double> beta, bool full) {
  TORCH_CHECK(!d1.empty(), "lazyfast: d1 must hold at least one layer");
  check_op_tensors("hadamard_gram_sum", c10::DeviceType::CUDA, {{"d1", d1}, {"h1", h1}, {"d2", d2}, {"h2", h2}});
  const c10::cuda::CUDAGuard guard(d1[0].device());
  const CudaMatmulPrecisionGuard precision;
  HadamardGramBackend be;
  be.accumulate = &accumulate_cuda;
  be.mirror = &mirror_cuda;
  be.min_panel = 2048;
  be.max_panel = 4096;
  be.max_cols = 16384;
  return hadamard_gram_sum_aten(be, d1, h1, d2, h2, h_scale, beta, full);
}

void register_hadamard_gram_cuda(torch::Library& m) { m.impl("hadamard_gram_sum", &hadamard_gram_sum_cuda); }

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CUDA, m) { register_hadamard_gram_cuda(m); }
LF_TORCH_LIBRARY_IMPL_LAYOUT_KEYS(CUDA, register_hadamard_gram_cuda)

}  // namespace lazyfast
