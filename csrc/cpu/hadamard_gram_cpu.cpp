// CPU backend of lazyfast::hadamard_gram_sum: the shared driver of csrc/hadamard_gram_aten.h
// (multithreaded BLAS GEMMs) with the accumulate and mirror steps as host loops
// (at::parallel_for over rows).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../hadamard_gram_aten.h"
#include "lazyfast/hadamard_gram.h"

namespace lazyfast {
namespace {

template <typename scalar_t>
void accumulate_typed(at::Tensor& out, int64_t offset, int64_t n2, int64_t kk, const at::Tensor& gd,
                      const at::Tensor& gh, int64_t ti, int64_t tj, double gamma, double beta, double scale) {
  scalar_t* o = out.data_ptr<scalar_t>() + offset;
  const scalar_t* d = gd.data_ptr<scalar_t>();
  const scalar_t* h = gh.data_ptr<scalar_t>();
  at::parallel_for(0, ti, 8, [&](int64_t b, int64_t e) {
    hadamard_accumulate_tile<scalar_t>(o + b * n2 * kk, n2, kk, d + b * tj, h + b * tj, tj, e - b, tj,
                                       static_cast<scalar_t>(gamma), static_cast<scalar_t>(beta),
                                       static_cast<scalar_t>(scale));
  });
}

void accumulate_cpu(at::Tensor& out, int64_t offset, int64_t n2, int64_t kk, const at::Tensor& gd,
                    const at::Tensor& gh, int64_t ti, int64_t tj, double gamma, double beta, double scale) {
  LF_DISPATCH_FLOAT(out, "out (Hadamard accumulate)", "hadamard_accumulate_cpu",
                    [&] { accumulate_typed<scalar_t>(out, offset, n2, kk, gd, gh, ti, tj, gamma, beta, scale); });
}

template <typename scalar_t>
void mirror_typed(at::Tensor& out, int64_t n, int64_t k) {
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, n, 16, [&](int64_t b0, int64_t e0) {
    for (int64_t i = b0; i < e0; ++i)
      for (int64_t j = 0; j <= i; ++j)
        for (int64_t a = 0; a < k; ++a)
          for (int64_t b = 0; b < k; ++b) hadamard_mirror_entry<scalar_t>(o, n, k, i, j, a, b);
  });
}

void mirror_cpu(at::Tensor& out, int64_t n, int64_t k) {
  LF_DISPATCH_FLOAT(out, "out (Hadamard mirror)", "hadamard_mirror_cpu", [&] { mirror_typed<scalar_t>(out, n, k); });
}

// d1[l]: (k, n1, w_l), h1[l]: (n1, v_l), d2/h2 likewise or empty -> (n1, n2) | (n1, n2, k, k)
at::Tensor hadamard_gram_sum_cpu(at::TensorList d1, at::TensorList h1, at::TensorList d2, at::TensorList h2,
                                 at::ArrayRef<double> h_scale, at::ArrayRef<double> beta, bool full) {
  TORCH_CHECK(!d1.empty(), "lazyfast: d1 must hold at least one layer");
  check_op_tensors("hadamard_gram_sum", c10::DeviceType::CPU, {{"d1", d1}, {"h1", h1}, {"d2", d2}, {"h2", h2}});
  HadamardGramBackend be;
  be.accumulate = &accumulate_cpu;
  be.mirror = &mirror_cpu;
  return hadamard_gram_sum_aten(be, d1, h1, d2, h2, h_scale, beta, full);
}

void register_hadamard_gram_cpu(torch::Library& m) { m.impl("hadamard_gram_sum", &hadamard_gram_sum_cpu); }

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CPU, m) { register_hadamard_gram_cpu(m); }
TORCH_LIBRARY_IMPL(lazyfast, MkldnnCPU, m) { register_hadamard_gram_cpu(m); }
LF_TORCH_LIBRARY_IMPL_LAYOUT_KEYS(CPU, register_hadamard_gram_cpu)

}  // namespace lazyfast
