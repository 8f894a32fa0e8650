// CPU backend of lazyfast::gram: the shared ATen driver of csrc/gram_aten.h (MKL/oneDNN GEMMs).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../gram_aten.h"

namespace lazyfast {
namespace {

// j1: (n1, P), j2: (n2, P) -> (n1, n2)
at::Tensor gram_cpu(const at::Tensor& j1, const at::Tensor& j2, bool accumulate_f64) {
  check_op_tensors("gram", c10::DeviceType::CPU, {{"j1", j1}, {"j2", j2}});
  return gram_aten(j1, j2, accumulate_f64);
}

void register_gram_cpu(torch::Library& m) { m.impl("gram", &gram_cpu); }

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CPU, m) { register_gram_cpu(m); }
TORCH_LIBRARY_IMPL(lazyfast, MkldnnCPU, m) { register_gram_cpu(m); }
LF_TORCH_LIBRARY_IMPL_LAYOUT_KEYS(CPU, register_gram_cpu)

}  // namespace lazyfast
