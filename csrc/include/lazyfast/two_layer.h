// Torch-free math of the two-layer network f(x) = s * B sigma(A x + c)
// (docs/gpu.md, "The math"), shared by the CPU launchers and the CUDA kernels.
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

// ----------------------------------------------------------------------------- Gram epilogues
// The two-layer Gram is Theta = s^2 (P + (G + bias) (.) Q) with P = Phi1 Phi2^T,
// Q = D1 D2^T (GEMMs over the m-chunks) and G = X1 X2^T (one GEMM, formed once per
// output block). The drivers (csrc/two_layer_aten.h) run the GEMMs through ATen
// on either device; these are the elementwise finishing steps, one rule each.
template <typename T>
LF_HD T gram_combine_value(T p, T g, T q, T bias, T s2) {
  return s2 * (p + (g + bias) * q);
}

// out[i*out_rs + j*out_cs] = s2 * (P[i, j] + (G[i, j] + bias) * Q[i, j]) for a (rows x cols)
// block; P absent (null) counts as 0 and may alias out (same strides); out2 (or null)
// receives the same value (full mode writes entries [a, b] and [b, a] at once).
template <typename T>
struct GramCombineParams {
  int64_t rows = 0, cols = 0;
  const T* p = nullptr;
  int64_t p_rs = 0, p_cs = 1;
  const T* g = nullptr;  // (rows, cols), ld_g
  int64_t ld_g = 0;
  const T* q = nullptr;  // (rows, cols), ld_q
  int64_t ld_q = 0;
  T* out = nullptr;
  T* out2 = nullptr;
  int64_t out_rs = 0, out_cs = 1;
  T bias = T(0), s2 = T(1);
};

template <typename T>
LF_HD void gram_combine_entry(const GramCombineParams<T>& p, int64_t i, int64_t j) {
  const T pv = p.p ? p.p[i * p.p_rs + j * p.p_cs] : T(0);
  const T v = gram_combine_value<T>(pv, p.g[i * p.ld_g + j], p.q[i * p.ld_q + j], p.bias, p.s2);
  p.out[i * p.out_rs + j * p.out_cs] = v;
  if (p.out2) p.out2[i * p.out_rs + j * p.out_cs] = v;
}

// Symmetric trace Gram (X2 = X1), finishing the block row [i0, i0 + ib) of the (n x n)
// output. On entry the upper block triangle of `out` holds P, its strict block-lower
// triangle Q^T, and qd the (ib x ib) diagonal Q block; g = X[i0:i0+ib] X[i0:]^T (ib x (n - i0)).
// Entry (i, jj), jj < n - i0, owns the pair {out[r][c], out[c][r]} (r = i0 + i, c = i0 + jj):
// block rows never share a pair, and in the diagonal block only i <= jj acts, so every
// entry is written by exactly one (i, jj). Both halves get the same value (exact symmetry).
template <typename T>
struct SymTraceFinalizeParams {
  T* out = nullptr;
  int64_t n = 0, i0 = 0, ib = 0;
  const T* g = nullptr;
  int64_t ld_g = 0;
  const T* qd = nullptr;
  int64_t ld_qd = 0;
  T bias = T(0), s2 = T(1);
};

template <typename T>
LF_HD void sym_trace_finalize_entry(const SymTraceFinalizeParams<T>& p, int64_t i, int64_t jj) {
  const int64_t r = p.i0 + i, c = p.i0 + jj;
  T* a = p.out + r * p.n + c;
  T* b = p.out + c * p.n + r;
  if (jj >= p.ib) {  // off-diagonal: P above, Q^T below
    const T v = gram_combine_value<T>(*a, p.g[i * p.ld_g + jj], *b, p.bias, p.s2);
    *a = v;
    *b = v;
    return;
  }
  if (jj < i) return;  // diagonal block: the pair is handled by (jj, i)
  const T vij = *a + (p.g[i * p.ld_g + jj] + p.bias) * p.qd[i * p.ld_qd + jj];
  if (jj == i) {
    *a = p.s2 * vij;
    return;
  }
  const T vji = *b + (p.g[jj * p.ld_g + i] + p.bias) * p.qd[jj * p.ld_qd + i];
  const T v = T(0.5) * p.s2 * (vij + vji);  // averaged: exactly symmetric
  *a = v;
  *b = v;
}

// Host walk of one block row (CPU backend): the same entries as sym_trace_finalize_entry,
// in 64-column panels so the transposed half stays in cache.
template <typename T>
inline void sym_trace_finalize_host(const SymTraceFinalizeParams<T>& p) {
  for (int64_t i = 0; i < p.ib; ++i)
    for (int64_t jj = i; jj < p.ib; ++jj) sym_trace_finalize_entry<T>(p, i, jj);
  const int64_t w = p.n - p.i0;
  for (int64_t j0 = p.ib; j0 < w; j0 += 64) {
    const int64_t j1 = w < j0 + 64 ? w : j0 + 64;
    for (int64_t i = 0; i < p.ib; ++i)
      for (int64_t jj = j0; jj < j1; ++jj) sym_trace_finalize_entry<T>(p, i, jj);
  }
}

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
