// CUDA backend of lazyfast::gram: the shared ATen driver of csrc/gram_aten.h (cuBLAS GEMMs),
// under the device guard and the lazyfast matmul precision (no silent TF32).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../gram_aten.h"
#include "../precision.h"

namespace lazyfast {
namespace {

// j1: (n1, P), j2: (n2, P) -> (n1, n2)
at::Tensor gram_cuda(const at::Tensor& j1, const at::Tensor& j2, bool accumulate_f64) {
  check_op_tensors("gram", c10::DeviceType::CUDA, {{"j1", j1}, {"j2", j2}});
  const c10::cuda::CUDAGuard guard(j1.device());
  const CudaMatmulPrecisionGuard precision;
  return gram_aten(j1, j2, accumulate_f64);
}

void register_gram_cuda(torch::Library& m) { m.impl("gram", &gram_cuda); }

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CUDA, m) { register_gram_cuda(m); }
LF_TORCH_LIBRARY_IMPL_LAYOUT_KEYS(CUDA, register_gram_cuda)

}  // namespace lazyfast
