// CPU backend of lazyfast::gram: the shared ATen driver of csrc/gram_aten.h (MKL/oneDNN GEMMs).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../gram_aten.h"

namespace lazyfast {
namespace {

// j1: (n1, P), j2: (n2, P) -> (n1, n2)
at::Tensor gram_cpu(const at::Tensor& j1, const at::Tensor& j2, bool accumulate_f64) {
  TORCH_CHECK(j1.device().is_cpu() && j2.device().is_cpu(), "lazyfast: gram_cpu got tensors on ", j1.device(),
              " and ", j2.device());
  return gram_aten(j1, j2, accumulate_f64);
}

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CPU, m) { m.impl("gram", &gram_cpu); }

}  // namespace lazyfast
