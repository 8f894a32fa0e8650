// CPU implementation of lazyfast::hadamard_gram_sum.
// Blocked over (row panel, column block) output blocks: per block and layer the two Gram
// blocks come from BLAS (at::mm_out, multithreaded) into bounded scratch and are fused into
// the output by hadamard_accumulate_tile (at::parallel_for over rows). No n1 x n2 per-layer
// Gram is ever held, and in the symmetric case (d2 = h2 = []) a panel only meets the columns
// at and right of its diagonal; the rest is mirrored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../hadamard_gram_args.h"
#include "lazyfast/hadamard_gram.h"

namespace lazyfast {
namespace {

// Row panels of height T against column blocks of width up to kMaxCols: large GEMMs keep BLAS
// near its peak rate, while in the symmetric case panel I only meets columns >= its first
// row (75% of the Gram work for two panels, -> 50% for many). Scratch is 2 * T * kMaxCols.
constexpr int64_t kMinPanel = 512;
constexpr int64_t kMaxPanel = 1024;
constexpr int64_t kMaxCols = 8192;

int64_t panel_rows(int64_t n1, bool symmetric) {
  if (!symmetric) return std::min(n1, kMaxPanel);
  return std::max<int64_t>(kMinPanel, std::min<int64_t>(kMaxPanel, ceil_div(n1, 2)));
}

template <typename scalar_t>
void accumulate_parallel(scalar_t* out, int64_t n2, int64_t kk, const scalar_t* gd, const scalar_t* gh, int64_t ti,
                         int64_t tj, double gamma, double beta, double scale) {
  at::parallel_for(0, ti, 8, [&](int64_t b, int64_t e) {
    hadamard_accumulate_tile<scalar_t>(out + b * n2 * kk, n2, kk, gd + b * tj, gh + b * tj, tj, e - b, tj,
                                       static_cast<scalar_t>(gamma), static_cast<scalar_t>(beta),
                                       static_cast<scalar_t>(scale));
  });
}

template <typename scalar_t>
void hadamard_gram_sum_cpu_impl(const HadamardGramFactors& f, at::ArrayRef<double> h_scale, at::ArrayRef<double> beta,
                                at::Tensor& out) {
  const int64_t n1 = f.n1, n2 = f.n2, k = f.k, kk = k * k;
  const auto& d2 = f.symmetric ? f.d1 : f.d2;
  const auto& h2 = f.symmetric ? f.h1 : f.h2;
  const int64_t T = panel_rows(n1, f.symmetric);
  const int64_t CW = std::min(n2, kMaxCols);
  at::Tensor gh_buf = at::empty({T * CW}, f.d1[0].options());
  at::Tensor gd_buf = at::empty({T * CW}, f.d1[0].options());
  scalar_t* o = out.data_ptr<scalar_t>();
  for (int64_t i0 = 0; i0 < n1; i0 += T) {
    const int64_t ti = std::min(T, n1 - i0);
    for (int64_t j0 = f.symmetric ? i0 : 0; j0 < n2; j0 += CW) {
      const int64_t tj = std::min(CW, n2 - j0);
      at::Tensor gh = gh_buf.narrow(0, 0, ti * tj).view({ti, tj});
      at::Tensor gd = gd_buf.narrow(0, 0, ti * tj).view({ti, tj});
      for (size_t l = 0; l < f.d1.size(); ++l) {
        at::mm_out(gh, f.h1[l].narrow(0, i0, ti), h2[l].narrow(0, j0, tj).t());
        for (int64_t a = 0; a < k; ++a) {
          const at::Tensor da = f.d1[l].select(0, a).narrow(0, i0, ti);
          for (int64_t b = 0; b < k; ++b) {
            at::mm_out(gd, da, d2[l].select(0, b).narrow(0, j0, tj).t());
            accumulate_parallel<scalar_t>(o + (i0 * n2 + j0) * kk + a * k + b, n2, kk, gd.data_ptr<scalar_t>(),
                                          gh.data_ptr<scalar_t>(), ti, tj, h_scale[l], beta[l], f.scale);
          }
        }
      }
    }
  }
  if (f.symmetric) {
    // Mirror out[i, j, a, b] = out[j, i, b, a] below the diagonal: fills the skipped blocks and
    // makes the result exactly symmetric (BLAS need not round the two halves of a block alike).
    at::parallel_for(0, n1, 16, [&](int64_t b0, int64_t e0) {
      for (int64_t i = b0; i < e0; ++i) {
        for (int64_t j = 0; j < i; ++j)
          for (int64_t a = 0; a < k; ++a)
            for (int64_t b = 0; b < k; ++b) o[(i * n2 + j) * kk + a * k + b] = o[(j * n2 + i) * kk + b * k + a];
        for (int64_t a = 1; a < k; ++a)  // the k x k block on the diagonal is symmetric too
          for (int64_t b = 0; b < a; ++b) o[(i * n2 + i) * kk + a * k + b] = o[(i * n2 + i) * kk + b * k + a];
      }
    });
  }
}

// d1[l]: (k, n1, w_l), h1[l]: (n1, v_l), d2/h2 likewise or empty -> (n1, n2) | (n1, n2, k, k)
at::Tensor hadamard_gram_sum_cpu(at::TensorList d1, at::TensorList h1, at::TensorList d2, at::TensorList h2,
                                 at::ArrayRef<double> h_scale, at::ArrayRef<double> beta, bool full) {
  const HadamardGramFactors f = hadamard_gram_prepare(d1, h1, d2, h2, h_scale, beta, full);
  TORCH_CHECK(f.d1[0].device().is_cpu(), "lazyfast: hadamard_gram_sum_cpu got tensors on ", f.d1[0].device());
  at::Tensor out = full ? at::zeros({f.n1, f.n2, f.k, f.k}, f.d1[0].options())
                        : at::zeros({f.n1, f.n2}, f.d1[0].options());
  if (f.n1 == 0 || f.n2 == 0) return out;
  if (out.scalar_type() == at::kDouble) {
    hadamard_gram_sum_cpu_impl<double>(f, h_scale, beta, out);
  } else {
    hadamard_gram_sum_cpu_impl<float>(f, h_scale, beta, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CPU, m) { m.impl("hadamard_gram_sum", &hadamard_gram_sum_cpu); }

}  // namespace lazyfast
