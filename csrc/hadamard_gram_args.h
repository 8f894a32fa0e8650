// Torch-side argument checks and factor preparation for lazyfast::hadamard_gram_sum,
// shared by the CPU and CUDA launchers.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "checks.h"

namespace lazyfast {

// Factors made contiguous; in trace mode D is flattened to (1, n, k*w) with scale 1/k.
struct HadamardGramFactors {
  std::vector<at::Tensor> d1, h1, d2, h2;  // d2/h2 empty in the symmetric case
  int64_t n1 = 0, n2 = 0, k = 1, k_out = 1;
  double scale = 1.0;
  bool symmetric = false;
};

inline void hadamard_gram_check_list(at::TensorList d, at::TensorList h, const char* nd, const char* nh,
                                     const at::Tensor& ref) {
  TORCH_CHECK(d.size() == h.size(), "lazyfast: ", nd, " has ", d.size(), " layers but ", nh, " has ", h.size());
  for (size_t l = 0; l < d.size(); ++l) {
    TORCH_CHECK(d[l].dim() == 3, "lazyfast: ", nd, "[", l, "] must be 3-D (k, n, w), got shape ", d[l].sizes());
    TORCH_CHECK(h[l].dim() == 2, "lazyfast: ", nh, "[", l, "] must be 2-D (n, v), got shape ", h[l].sizes());
    TORCH_CHECK(d[l].scalar_type() == ref.scalar_type() && h[l].scalar_type() == ref.scalar_type(), "lazyfast: ",
                nd, "[", l, "] and ", nh, "[", l, "] must have dtype ", ref.scalar_type());
    TORCH_CHECK(d[l].device() == ref.device() && h[l].device() == ref.device(), "lazyfast: ", nd, "[", l, "] and ",
                nh, "[", l, "] must be on ", ref.device());
    TORCH_CHECK(d[l].size(0) == d[0].size(0) && d[l].size(1) == d[0].size(1), "lazyfast: ", nd, "[", l,
                "] has shape ", d[l].sizes(), "; every layer needs (k, n) = (", d[0].size(0), ", ", d[0].size(1), ")");
    TORCH_CHECK(h[l].size(0) == d[l].size(1), "lazyfast: ", nh, "[", l, "] has ", h[l].size(0), " rows but ", nd,
                "[", l, "] has ", d[l].size(1), " samples");
  }
}

inline HadamardGramFactors hadamard_gram_prepare(at::TensorList d1, at::TensorList h1, at::TensorList d2,
                                                 at::TensorList h2, at::ArrayRef<double> h_scale,
                                                 at::ArrayRef<double> beta, bool full) {
  TORCH_CHECK(!d1.empty(), "lazyfast: d1 must hold at least one layer");
  LF_CHECK_FLOAT(d1[0], "d1[0]");
  hadamard_gram_check_list(d1, h1, "d1", "h1", d1[0]);
  const size_t L = d1.size();
  TORCH_CHECK(h_scale.size() == L, "lazyfast: h_scale has ", h_scale.size(), " entries but there are ", L, " layers");
  TORCH_CHECK(beta.size() == L, "lazyfast: beta has ", beta.size(), " entries but there are ", L, " layers");
  for (size_t l = 0; l < L; ++l)
    TORCH_CHECK(std::isfinite(h_scale[l]) && std::isfinite(beta[l]), "lazyfast: h_scale and beta must be finite");
  TORCH_CHECK(d2.size() == h2.size(), "lazyfast: d2 and h2 must both be empty (symmetric case) or both hold ", L,
              " layers");
  HadamardGramFactors f;
  f.symmetric = d2.empty();
  if (!f.symmetric) {
    TORCH_CHECK(d2.size() == L, "lazyfast: d2 has ", d2.size(), " layers but d1 has ", L);
    hadamard_gram_check_list(d2, h2, "d2", "h2", d1[0]);
    for (size_t l = 0; l < L; ++l) {
      TORCH_CHECK(d2[l].size(0) == d1[l].size(0) && d2[l].size(2) == d1[l].size(2), "lazyfast: d2[", l,
                  "] has shape ", d2[l].sizes(), ", incompatible with d1[", l, "] ", d1[l].sizes());
      TORCH_CHECK(h2[l].size(1) == h1[l].size(1), "lazyfast: h2[", l, "] has ", h2[l].size(1),
                  " features but h1[", l, "] has ", h1[l].size(1));
    }
  }
  f.k_out = d1[0].size(0);
  f.n1 = d1[0].size(1);
  f.n2 = f.symmetric ? f.n1 : d2[0].size(1);
  f.k = full ? f.k_out : 1;
  f.scale = full ? 1.0 : 1.0 / static_cast<double>(f.k_out);
  auto prep_d = [&](const at::Tensor& d) {
    // trace: (k, n, w) -> (1, n, k*w), so sum_a <D_a[i], D_a[j]> is one dot product
    return full ? d.contiguous() : d.permute({1, 0, 2}).reshape({1, d.size(1), d.size(0) * d.size(2)}).contiguous();
  };
  for (size_t l = 0; l < L; ++l) {
    f.d1.push_back(prep_d(d1[l]));
    f.h1.push_back(h1[l].contiguous());
    if (!f.symmetric) {
      f.d2.push_back(prep_d(d2[l]));
      f.h2.push_back(h2[l].contiguous());
    }
  }
  return f;
}

}  // namespace lazyfast
