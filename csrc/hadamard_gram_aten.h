// The ONE driver of lazyfast::hadamard_gram_sum, shared by the CPU and CUDA backends
// (docs/gpu.md). Blocked over (row panel, column block) output blocks: per block and layer
// the two Gram blocks come from ATen GEMMs (at::mm_out: BLAS on the CPU, cuBLAS on CUDA)
// into bounded scratch and are fused into the output by the backend's accumulate step (the
// rule of lazyfast/hadamard_gram.h). No n1 x n2 per-layer Gram is ever held, and in the
// symmetric case (d2 = h2 = []) a panel only meets the columns at and right of its
// diagonal; the backend's mirror fills the rest.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "hadamard_gram_args.h"
#include "knobs.h"
#include "lazyfast/hadamard_gram.h"

namespace lazyfast {

struct HadamardGramBackend {
  // out[(i*n2 + j)*kk] += scale gd (gamma gh + beta) over a (ti x tj) tile (see HadamardAccumulateParams).
  void (*accumulate)(at::Tensor& out, int64_t offset, int64_t n2, int64_t kk, const at::Tensor& gd,
                     const at::Tensor& gh, int64_t ti, int64_t tj, double gamma, double beta, double scale) = nullptr;
  // Symmetric case: out[i, j, a, b] = out[j, i, b, a] below the diagonal.
  void (*mirror)(at::Tensor& out, int64_t n, int64_t k) = nullptr;
  // Panel rows (min, max) and column-block width: CPU 512..1024 x 8192 (GEMMs near BLAS
  // peak, scratch 2 x 8 Mi entries); CUDA 2048..4096 x 16384 for cuBLAS.
  int64_t min_panel = 512, max_panel = 1024, max_cols = 8192;
};

// LAZYFAST_HADAMARD_PANEL_ROWS / _COLS (knobs.h: read once, not per call) override the block
// shape on both devices (tests use them to force many blocks at small n).
inline int64_t hadamard_panel_rows(const HadamardGramBackend& be, int64_t forced, int64_t n1, bool symmetric) {
  if (forced > 0) return std::min(n1, forced);
  if (!symmetric) return std::min(n1, be.max_panel);
  return std::max<int64_t>(be.min_panel, std::min<int64_t>(be.max_panel, ceil_div(n1, 2)));
}

// The caller (backend entry point) has set the device guard and the matmul precision.
inline at::Tensor hadamard_gram_sum_aten(const HadamardGramBackend& be, at::TensorList d1, at::TensorList h1,
                                         at::TensorList d2, at::TensorList h2, at::ArrayRef<double> h_scale,
                                         at::ArrayRef<double> beta, bool full) {
  const HadamardGramFactors f = hadamard_gram_prepare(d1, h1, d2, h2, h_scale, beta, full);
  const auto opts = f.d1[0].options();
  at::Tensor out = full ? at::zeros({f.n1, f.n2, f.k, f.k}, opts) : at::zeros({f.n1, f.n2}, opts);
  if (f.n1 == 0 || f.n2 == 0) return out;
  const int64_t n1 = f.n1, n2 = f.n2, k = f.k, kk = k * k;
  const auto& D2 = f.symmetric ? f.d1 : f.d2;
  const auto& H2 = f.symmetric ? f.h1 : f.h2;
  const Knobs kn = knobs();
  const int64_t T = hadamard_panel_rows(be, kn.hadamard_panel_rows, n1, f.symmetric);
  const int64_t CW = std::min(n2, knob_or(kn.hadamard_panel_cols, be.max_cols));
  at::Tensor gh_buf = at::empty({T * CW}, opts), gd_buf = at::empty({T * CW}, opts);
  for (int64_t i0 = 0; i0 < n1; i0 += T) {
    const int64_t ti = std::min(T, n1 - i0);
    for (int64_t j0 = f.symmetric ? i0 : 0; j0 < n2; j0 += CW) {
      const int64_t tj = std::min(CW, n2 - j0);
      at::Tensor gh = gh_buf.narrow(0, 0, ti * tj).view({ti, tj});
      at::Tensor gd = gd_buf.narrow(0, 0, ti * tj).view({ti, tj});
      for (size_t l = 0; l < f.d1.size(); ++l) {
        at::mm_out(gh, f.h1[l].narrow(0, i0, ti), H2[l].narrow(0, j0, tj).t());
        for (int64_t a = 0; a < k; ++a) {
          const at::Tensor da = f.d1[l].select(0, a).narrow(0, i0, ti);
          for (int64_t b = 0; b < k; ++b) {
            at::mm_out(gd, da, D2[l].select(0, b).narrow(0, j0, tj).t());
            be.accumulate(out, (i0 * n2 + j0) * kk + a * k + b, n2, kk, gd, gh, ti, tj, h_scale[l], beta[l], f.scale);
          }
        }
      }
    }
  }
  // Mirror: fills the skipped blocks and makes the result exactly symmetric (the GEMMs need
  // not round the two halves of a block alike).
  if (f.symmetric) be.mirror(out, n1, k);
  return out;
}

}  // namespace lazyfast
