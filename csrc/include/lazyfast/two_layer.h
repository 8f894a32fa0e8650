// Torch-free math of the two-layer network f(x) = s * B sigma(A x + c)
// (DESIGN.md §1.1), shared by the CPU launchers and the CUDA kernels.
//
// Every two-layer op is built from GEMMs plus one elementwise step on an
// m-chunk of pre-activations Z = X A_chunk^T (rows x cols):
//     z    = Z[i, j] + c[j]                      (hidden bias, optional)
//     Phi  = sigma(z)                            (optional output, may alias Z)
//     D    = sigma'(z) * w[j] * M[i, j] * r[i]   (optional output; w, M, r optional;
//                                                 D may alias M, Phi may alias Z)
// w is a per-neuron weight (sqrt of the mean B^2 for the trace Gram, B_a*B_b for
// the full Gram, B_0 for the k=1 JVP) and M a per-entry multiplier (R B for the VJP).
#pragma once

#include <cstdint>

#include "lazyfast/activations.h"
#include "lazyfast/common.h"

namespace lazyfast {

// Pointers of one elementwise "activate" step. Row-major matrices with leading
// dimensions (elements between rows); null pointers mean "absent".
template <typename T>
struct ActivateParams {
  int64_t rows = 0;
  int64_t cols = 0;
  const T* z = nullptr;  // (rows, cols), ld_z
  int64_t ld_z = 0;
  const T* bias = nullptr;   // (cols,) or null
  const T* w = nullptr;      // (cols,) or null
  const T* mul = nullptr;    // (rows, cols), ld_mul, or null
  int64_t ld_mul = 0;
  const T* rowmul = nullptr;  // (rows,) or null: D also times rowmul[i]
  T* phi = nullptr;  // (rows, cols), ld_phi, or null; may equal z
  int64_t ld_phi = 0;
  T* deriv = nullptr;  // (rows, cols), ld_deriv, or null
  int64_t ld_deriv = 0;
  // Host-only column reductions (the CPU VJP; rows must then be walked by one thread):
  T* phi_colsum = nullptr;    // (cols,) or null: += sum_i rowmul[i] * sigma(z_ij) (rowmul 1 if absent)
  T* deriv_colsum = nullptr;  // (cols,) or null: += sum_i D_ij (needs deriv)
};

// One entry of the activate step; the activation is a compile-time constant so
// the switch in act_value/act_deriv folds away and the row loop vectorizes.
template <typename T, int kAct>
LF_HD void activate_entry(const ActivateParams<T>& p, int64_t i, int64_t j) {
  constexpr Activation act = static_cast<Activation>(kAct);
  T z = p.z[i * p.ld_z + j];
  if (p.bias) z += p.bias[j];
  if (p.deriv) {
    T dv = act_deriv<T>(act, z);
    if (p.w) dv *= p.w[j];
    if (p.mul) dv *= p.mul[i * p.ld_mul + j];
    if (p.rowmul) dv *= p.rowmul[i];
    p.deriv[i * p.ld_deriv + j] = dv;
  }
  if (p.phi) p.phi[i * p.ld_phi + j] = act_value<T>(act, z);
}

// Host routine for one row (CPU launcher). The pointer tests are hoisted out of
// the inner loops, which are plain and vectorize (ReLU, identity) or call libm.
template <typename T, int kAct>
inline void activate_row(const ActivateParams<T>& p, int64_t i) {
  constexpr Activation act = static_cast<Activation>(kAct);
  constexpr int64_t kSeg = 256;
  T zbuf[kSeg];
  const T* zr = p.z + i * p.ld_z;
  T* phr = p.phi ? p.phi + i * p.ld_phi : nullptr;
  T* dr = p.deriv ? p.deriv + i * p.ld_deriv : nullptr;
  const T* mr = p.mul ? p.mul + i * p.ld_mul : nullptr;
  for (int64_t j0 = 0; j0 < p.cols; j0 += kSeg) {
    const int64_t len = p.cols - j0 < kSeg ? p.cols - j0 : kSeg;
    if (p.bias) {
      for (int64_t j = 0; j < len; ++j) zbuf[j] = zr[j0 + j] + p.bias[j0 + j];
    } else {
      for (int64_t j = 0; j < len; ++j) zbuf[j] = zr[j0 + j];
    }
    if (dr) {
      T* d = dr + j0;
      // Each d[j] is written after mr[j] is read, so deriv may alias mul.
      const T* w = p.w ? p.w + j0 : nullptr;
      const T* mj = mr ? mr + j0 : nullptr;
      if (w && mj) {
        for (int64_t j = 0; j < len; ++j) d[j] = act_deriv<T>(act, zbuf[j]) * w[j] * mj[j];
      } else if (mj) {
        for (int64_t j = 0; j < len; ++j) d[j] = act_deriv<T>(act, zbuf[j]) * mj[j];
      } else if (w) {
        for (int64_t j = 0; j < len; ++j) d[j] = act_deriv<T>(act, zbuf[j]) * w[j];
      } else {
        for (int64_t j = 0; j < len; ++j) d[j] = act_deriv<T>(act, zbuf[j]);
      }
      if (p.rowmul) {
        const T rm = p.rowmul[i];
        for (int64_t j = 0; j < len; ++j) d[j] *= rm;
      }
    }
    if (dr && p.deriv_colsum) {
      const T* d = dr + j0;
      T* cs = p.deriv_colsum + j0;
      for (int64_t j = 0; j < len; ++j) cs[j] += d[j];
    }
    if (phr || p.phi_colsum) {
      T* f = phr ? phr + j0 : zbuf;  // sigma(z) may overwrite zbuf: z is not needed any more
      for (int64_t j = 0; j < len; ++j) f[j] = act_value<T>(act, zbuf[j]);
      if (p.phi_colsum) {
        const T rm = p.rowmul ? p.rowmul[i] : T(1);
        T* cs = p.phi_colsum + j0;
        for (int64_t j = 0; j < len; ++j) cs[j] += rm * f[j];
      }
    }
  }
}

// ----------------------------------------------------------------------------- CUDA Gram
// Features of one m-chunk for the fused CUDA Gram, written k-major:
//   phiT[j, i] = sigma(z_ij), sigT[j, i] = sigma'(z_ij) * w[j], z_ij = x_i . A_j + bias_j.
template <typename T>
struct TwoLayerFeatureParams {
  int64_t n = 0, d = 0, mc = 0;  // rows of x, input dim, neurons in the chunk
  const T* x = nullptr;          // (n, d) row-major
  const T* A = nullptr;          // (mc, d) row-major: rows c0..c0+mc of A
  const T* bias = nullptr;       // (mc,) or null
  const T* w = nullptr;          // (mc,) or null (weight 1)
  T* phiT = nullptr;             // (mc, ld) or null (not written)
  T* sigT = nullptr;             // (mc, ld) or null
  int64_t ld = 0;                // >= n
};

// One chunk of the fused Gram: out[i*out_rs + j*out_cs] +=
//   scale2 * ([with_p] phi1_i . phi2_j + (x1_i . x2_j + [bias]) * sig1_i . sig2_j),
// the dots running over the chunk's mc neurons (features k-major, as above).
// out_mirror (or null) receives the same values (full mode writes [a, b] and [b, a]);
// upper_only skips output tiles strictly below the diagonal (X2 = X1).
template <typename T>
struct TwoLayerGramParams {
  int64_t n1 = 0, n2 = 0, d = 0, mc = 0;
  const T* phi1 = nullptr;
  const T* sig1 = nullptr;
  int64_t ld1 = 0;
  const T* phi2 = nullptr;
  const T* sig2 = nullptr;
  int64_t ld2 = 0;
  const T* x1 = nullptr;  // (n1, d)
  const T* x2 = nullptr;  // (n2, d)
  T* out = nullptr;
  T* out_mirror = nullptr;
  int64_t out_rs = 0, out_cs = 1;
  T scale2 = T(1);
  bool bias = false;
  bool with_p = true;
  bool upper_only = false;
};

// Sizing of the m-chunks. The CPU and CUDA drivers pick the chunk so that the
// per-chunk buffers (a few (rows x chunk) matrices) stay within a workspace
// budget; extra memory is then O(chunk * rows), never O(n * m).
LF_HD int64_t two_layer_chunk(int64_t m, int64_t rows, int64_t buffers, int64_t budget_elems, int64_t min_chunk,
                              int64_t max_chunk) {
  int64_t c = rows > 0 && buffers > 0 ? budget_elems / (rows * buffers) : max_chunk;
  if (c > max_chunk) c = max_chunk;
  if (c < min_chunk) c = min_chunk;
  if (c > m) c = m;
  if (c < 1) c = 1;
  return c;
}

}  // namespace lazyfast
