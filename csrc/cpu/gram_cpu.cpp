// CPU implementation of lazyfast::gram: blocked over output tiles, tiles in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "lazyfast/gram.h"

namespace lazyfast {
namespace {

template <typename scalar_t, typename acc_t>
void gram_cpu_impl(const GramParams& prm, const scalar_t* j1, const scalar_t* j2, scalar_t* g) {
  const int64_t tiles_i = ceil_div(prm.n1, kGramTileI);
  const int64_t tiles_j = ceil_div(prm.n2, kGramTileJ);
  at::parallel_for(0, tiles_i * tiles_j, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(kGramTileI * kGramTileJ);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = (t / tiles_j) * kGramTileI, j0 = (t % tiles_j) * kGramTileJ;
      const int64_t i1 = std::min(i0 + kGramTileI, prm.n1), j1e = std::min(j0 + kGramTileJ, prm.n2);
      gram_tile<scalar_t, acc_t>(prm, j1, j2, g, i0, i1, j0, j1e, acc.data());
    }
  });
}

// j1: (n1, P), j2: (n2, P) -> (n1, n2)
at::Tensor gram_cpu(const at::Tensor& j1, const at::Tensor& j2, bool accumulate_f64) {
  LF_CHECK_DIM(j1, 2, "j1");
  LF_CHECK_DIM(j2, 2, "j2");
  LF_CHECK_FLOAT(j1, "j1");
  LF_CHECK_SAME_DTYPE(j1, j2, "j1", "j2");
  TORCH_CHECK(j1.size(1) == j2.size(1), "lazyfast: j2 has ", j2.size(1), " columns but j1 has ", j1.size(1),
              " (both must be flattened Jacobians over the same parameters)");
  TORCH_CHECK(j1.device().is_cpu() && j2.device().is_cpu(), "lazyfast: gram_cpu got non-CPU tensors");
  const at::Tensor a = j1.contiguous(), b = j2.contiguous();
  at::Tensor g = at::empty({a.size(0), b.size(0)}, a.options());
  GramParams prm;
  prm.n1 = a.size(0);
  prm.n2 = b.size(0);
  prm.p = a.size(1);
  if (a.scalar_type() == at::kDouble) {
    gram_cpu_impl<double, double>(prm, a.data_ptr<double>(), b.data_ptr<double>(), g.data_ptr<double>());
  } else if (accumulate_f64) {
    gram_cpu_impl<float, double>(prm, a.data_ptr<float>(), b.data_ptr<float>(), g.data_ptr<float>());
  } else {
    gram_cpu_impl<float, float>(prm, a.data_ptr<float>(), b.data_ptr<float>(), g.data_ptr<float>());
  }
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CPU, m) { m.impl("gram", &gram_cpu); }

}  // namespace lazyfast
