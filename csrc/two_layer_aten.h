// Torch-side drivers of the two-layer Gram, JVP, VJP and NTK.v: ONE driver per op,
// shared by the CPU and CUDA backends (docs/gpu.md, "One driver per op").
//
// Every op is a loop over m-chunks of neurons (and, where needed, blocks of
// rows) made of ATen GEMMs on bounded tiles (MKL/oneDNN on the CPU, cuBLAS on
// CUDA) plus a few elementwise steps whose math lives once in the torch-free
// headers (lazyfast/two_layer.h) and that each backend launches: the activate
// step and the two Gram epilogues (TwoLayerBackend). Extra memory is
// O(rows * chunk), never an n x m buffer for the whole batch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "knobs.h"
#include "lazyfast/activations.h"
#include "lazyfast/two_layer.h"

namespace lazyfast {

// Workspace (bytes) the drivers may allocate besides their outputs: the value of
// LAZYFAST_TWO_LAYER_WORKSPACE_BYTES when set (knobs.h: read once, not per call; tests shrink
// it to force many chunks and row blocks), used as it is by every driver on every device;
// when unset, the default of the driver: 128 MiB, except the CUDA Gram walk (two_layer_ntk on
// CUDA, and on the CPU under LAZYFAST_DRIVER_WALK=cuda), 512 MiB for larger cuBLAS tiles
// (TwoLayerBackend::default_workspace_bytes).
constexpr int64_t kTwoLayerWorkspaceBytes = int64_t(128) << 20;
constexpr int64_t kTwoLayerCudaGramWorkspaceBytes = int64_t(512) << 20;

inline int64_t two_layer_workspace_bytes(int64_t fallback = kTwoLayerWorkspaceBytes) {
  return knob_or(knobs().two_layer_workspace_bytes, fallback);
}

// Tensors of one activate step: 2-D with unit column stride; undefined = absent.
struct ActivateArgs {
  at::Tensor z, bias, w, mul, phi, deriv, rowmul;
  at::Tensor phi_colsum, deriv_colsum;  // CPU only (1-D, contiguous)
};
using ActivateFn = void (*)(int64_t activation, const ActivateArgs& args);

template <typename T>
ActivateParams<T> activate_params(const ActivateArgs& a) {
  ActivateParams<T> p;
  p.rows = a.z.size(0);
  p.cols = a.z.size(1);
  p.z = a.z.data_ptr<T>();
  p.ld_z = a.z.stride(0);
  if (a.bias.defined()) p.bias = a.bias.data_ptr<T>();
  if (a.w.defined()) p.w = a.w.data_ptr<T>();
  if (a.mul.defined()) {
    p.mul = a.mul.data_ptr<T>();
    p.ld_mul = a.mul.stride(0);
  }
  if (a.rowmul.defined()) p.rowmul = a.rowmul.data_ptr<T>();
  if (a.phi_colsum.defined()) p.phi_colsum = a.phi_colsum.data_ptr<T>();
  if (a.deriv_colsum.defined()) p.deriv_colsum = a.deriv_colsum.data_ptr<T>();
  if (a.phi.defined()) {
    p.phi = a.phi.data_ptr<T>();
    p.ld_phi = a.phi.stride(0);
  }
  if (a.deriv.defined()) {
    p.deriv = a.deriv.data_ptr<T>();
    p.ld_deriv = a.deriv.stride(0);
  }
  return p;
}

// Parameters of the two Gram epilogues (lazyfast/two_layer.h), from tensors: one definition for the
// CPU loops and the CUDA kernels.
template <typename T>
GramCombineParams<T> combine_params(const at::Tensor& out, const at::Tensor& out2, const at::Tensor& p,
                                    const at::Tensor& g, const at::Tensor& q, bool bias, double s2) {
  GramCombineParams<T> c;
  c.rows = out.size(0);
  c.cols = out.size(1);
  c.out = out.data_ptr<T>();
  c.out_rs = out.stride(0);
  c.out_cs = out.stride(1);
  if (out2.defined()) c.out2 = out2.data_ptr<T>();
  if (p.defined()) {
    c.p = p.data_ptr<T>();
    c.p_rs = p.stride(0);
    c.p_cs = p.stride(1);
  }
  c.g = g.data_ptr<T>();
  c.ld_g = g.stride(0);
  c.q = q.data_ptr<T>();
  c.ld_q = q.stride(0);
  c.bias = bias ? T(1) : T(0);
  c.s2 = static_cast<T>(s2);
  return c;
}

template <typename T>
SymTraceFinalizeParams<T> sym_finalize_params(const at::Tensor& out, int64_t i0, int64_t ib, const at::Tensor& g,
                                              const at::Tensor& qd, bool bias, double s2) {
  SymTraceFinalizeParams<T> p;
  p.out = out.data_ptr<T>();
  p.n = out.size(0);
  p.i0 = i0;
  p.ib = ib;
  p.g = g.data_ptr<T>();
  p.ld_g = g.stride(0);
  p.qd = qd.data_ptr<T>();
  p.ld_qd = qd.stride(0);
  p.bias = bias ? T(1) : T(0);
  p.s2 = static_cast<T>(s2);
  return p;
}

// ----------------------------------------------------------------------------- argument checks
inline void check_two_layer_weights(const at::Tensor& A, const std::optional<at::Tensor>& c, const at::Tensor& B,
                                    double scale, int64_t activation, const char* op) {
  LF_CHECK_DIM(A, 2, "A (hidden weight, (m, d))");
  LF_CHECK_FLOAT(A, "A");
  LF_CHECK_DIM(B, 2, "B (output weight, (k, m))");
  LF_CHECK_SAME_DTYPE(A, B, "A", "B");
  LF_CHECK_SAME_DEVICE(A, B, "A", "B");
  TORCH_CHECK(B.size(1) == A.size(0), "lazyfast: ", op, ": B must have shape (k, m) with m = A.size(0) = ",
              A.size(0), ", got ", B.sizes());
  TORCH_CHECK(B.size(0) >= 1, "lazyfast: ", op, ": B must have at least one output row (k >= 1), got ", B.sizes());
  if (c.has_value()) {
    LF_CHECK_DIM(*c, 1, "c (hidden bias, (m,))");
    LF_CHECK_SAME_DTYPE(A, *c, "A", "c");
    LF_CHECK_SAME_DEVICE(A, *c, "A", "c");
    TORCH_CHECK(c->size(0) == A.size(0), "lazyfast: ", op, ": c must have shape (", A.size(0), ",), got ",
                c->sizes());
  }
  TORCH_CHECK(std::isfinite(scale), "lazyfast: ", op, ": scale must be finite, got ", scale);
  TORCH_CHECK(valid_activation(activation), "lazyfast: ", op, ": activation code must be in [0, ", kNumActivations,
              "), got ", activation);
}

inline void check_two_layer_input(const at::Tensor& x, const at::Tensor& A, const char* name, const char* op) {
  TORCH_CHECK(x.dim() == 2, "lazyfast: ", op, ": ", name, " must be 2-D (n, d), got shape ", x.sizes());
  LF_CHECK_SAME_DTYPE(A, x, "A", name);
  LF_CHECK_SAME_DEVICE(A, x, "A", name);
  TORCH_CHECK(x.size(1) == A.size(1), "lazyfast: ", op, ": ", name, " has d = ", x.size(1), " features but A has d = ",
              A.size(1));
}

inline void check_like(const at::Tensor& t, const at::Tensor& A, at::IntArrayRef shape, const char* name,
                       const char* op) {
  LF_CHECK_SAME_DTYPE(A, t, "A", name);
  LF_CHECK_SAME_DEVICE(A, t, "A", name);
  TORCH_CHECK(t.sizes() == shape, "lazyfast: ", op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// ----------------------------------------------------------------------------- helpers
// The workspace in elements of t's dtype (`fallback`: the driver's default in bytes).
inline int64_t elem_budget(const at::Tensor& t, int64_t fallback = kTwoLayerWorkspaceBytes) {
  return two_layer_workspace_bytes(fallback) / t.element_size();
}

inline at::Tensor opt_narrow(const std::optional<at::Tensor>& t, int64_t dim, int64_t start, int64_t len) {
  return t.has_value() ? t->narrow(dim, start, len) : at::Tensor();
}

// Z = X A_c^T into `z` (rows, mc), then the activate step.
inline void chunk_features(ActivateFn activate, int64_t act, const at::Tensor& x, const at::Tensor& A_c,
                           const at::Tensor& bias_c, const at::Tensor& w_c, const at::Tensor& mul, at::Tensor& z,
                           at::Tensor phi, at::Tensor deriv, const at::Tensor& rowmul = at::Tensor()) {
  at::mm_out(z, x, A_c.t());
  ActivateArgs a;
  a.rowmul = rowmul;
  a.z = z;
  a.bias = bias_c;
  a.w = w_c;
  a.mul = mul;
  a.phi = phi;
  a.deriv = deriv;
  activate(act, a);
}

// ----------------------------------------------------------------------------- JVP
// out[t, i, a] = s sum_j [ dB_taj sigma(z_ij) + B_aj sigma'(z_ij) (dA_tj . x_i + dc_tj) ].
// k == 1: the dA term is x_i . (sum_j B_j sigma'(z_ij) dA_tj): one GEMM V (rows x mc)
//         times dA_chunk (mc x T d) accumulated in W (rows, T, d), dotted with x at the end;
// k > 1:  U_t = X dA_t^T (T, rows, mc), U (.)= sigma'(Z), out += U B^T.
inline at::Tensor two_layer_jvp_aten(ActivateFn activate, const at::Tensor& x_in, const at::Tensor& A_in,
                                     const std::optional<at::Tensor>& c_in, const at::Tensor& B_in, double scale,
                                     int64_t act, const std::optional<at::Tensor>& dA_in,
                                     const std::optional<at::Tensor>& dc_in, const std::optional<at::Tensor>& dB_in) {
  const char* op = "two_layer_jvp";
  check_two_layer_weights(A_in, c_in, B_in, scale, act, op);
  check_two_layer_input(x_in, A_in, "x", op);
  const int64_t n = x_in.size(0), m = A_in.size(0), d = A_in.size(1), k = B_in.size(0);
  TORCH_CHECK(dA_in.has_value() || dc_in.has_value() || dB_in.has_value(), "lazyfast: ", op,
              ": at least one tangent (dA, dc or dB) must be given");
  int64_t T = -1;
  auto take_T = [&](const std::optional<at::Tensor>& t, const char* name, int64_t dim) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->dim() == dim, "lazyfast: ", op, ": ", name, " must be ", dim, "-D with a leading tangent dim T, got ",
                t->sizes());
    if (T < 0) T = t->size(0);
    TORCH_CHECK(t->size(0) == T, "lazyfast: ", op, ": ", name, " has ", t->size(0), " tangents but another has ", T);
  };
  take_T(dA_in, "dA", 3);
  take_T(dc_in, "dc", 2);
  take_T(dB_in, "dB", 3);
  if (dA_in.has_value()) check_like(*dA_in, A_in, {T, m, d}, "dA", op);
  if (dc_in.has_value()) check_like(*dc_in, A_in, {T, m}, "dc", op);
  if (dB_in.has_value()) check_like(*dB_in, A_in, {T, k, m}, "dB", op);
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous();
  std::optional<at::Tensor> c, dA, dc, dB;
  if (c_in.has_value()) c = c_in->contiguous();
  if (dA_in.has_value()) dA = dA_in->contiguous();
  if (dc_in.has_value()) dc = dc_in->contiguous();
  if (dB_in.has_value()) dB = dB_in->contiguous();
  at::Tensor out = at::zeros({T, n, k}, x.options());
  if (n == 0 || T == 0 || m == 0) return out;
  const bool use_w = (k == 1) && dA.has_value();
  const bool use_u = (k > 1) && dA.has_value();
  const int64_t budget = elem_budget(x);
  // Rows per block: the per-block accumulators (rows x T (k + d)) take at most a quarter of the workspace.
  int64_t rb = std::min<int64_t>(n, std::max<int64_t>(32, budget / 4 / std::max<int64_t>(1, T * (k + (use_w ? d : 0)))));
  // Chunk: phi, deriv (rows x mc) and for k > 1 the (T, rows, mc) U buffer.
  const int64_t per_col = rb * (2 + (use_u ? T : 0));
  const int64_t mc = std::max<int64_t>(1, std::min<int64_t>(m, std::max<int64_t>(16, std::min<int64_t>(2048, budget / 2 / per_col))));
  at::Tensor phib = at::empty({rb, mc}, x.options()), db = at::empty({rb, mc}, x.options());
  at::Tensor ub = use_u ? at::empty({T, rb, mc}, x.options()) : at::Tensor();
  at::Tensor accb = at::empty({rb, T * k}, x.options());
  at::Tensor wb = use_w ? at::empty({rb, T * d}, x.options()) : at::Tensor();
  for (int64_t i0 = 0; i0 < n; i0 += rb) {
    const int64_t ib = std::min(rb, n - i0);
    at::Tensor xb = x.narrow(0, i0, ib);
    at::Tensor acc = accb.narrow(0, 0, ib);  // (ib, T*k)
    acc.zero_();
    at::Tensor wacc = use_w ? wb.narrow(0, 0, ib) : at::Tensor();
    if (use_w) wacc.zero_();
    for (int64_t c0 = 0; c0 < m; c0 += mc) {
      const int64_t len = std::min(mc, m - c0);
      at::Tensor phi = phib.narrow(0, 0, ib).narrow(1, 0, len), dv = db.narrow(0, 0, ib).narrow(1, 0, len);
      at::Tensor B_c = B.narrow(1, c0, len);  // (k, len)
      // k == 1: deriv carries the output weight, V = sigma'(Z) diag(B_0).
      chunk_features(activate, act, xb, A.narrow(0, c0, len), opt_narrow(c, 0, c0, len),
                     k == 1 ? B_c[0] : at::Tensor(), at::Tensor(), phi, phi, dv);
      if (dB.has_value()) acc.addmm_(phi, dB->narrow(2, c0, len).reshape({T * k, len}).t());
      if (dc.has_value()) {
        at::Tensor dc_c = dc->narrow(1, c0, len);  // (T, len)
        if (k == 1) {
          acc.addmm_(dv, dc_c.t());
        } else {
          at::Tensor mcol = (dc_c.unsqueeze(1) * B_c.unsqueeze(0)).reshape({T * k, len});
          acc.addmm_(dv, mcol.t());
        }
      }
      if (use_w) {
        // (len, T*d) copy of the tangent chunk so one GEMM covers all T.
        at::Tensor dA_c = dA->narrow(1, c0, len).permute({1, 0, 2}).reshape({len, T * d});
        wacc.addmm_(dv, dA_c);
      } else if (use_u) {
        at::Tensor u = ub.narrow(1, 0, ib).narrow(2, 0, len);  // (T, ib, len)
        at::matmul_out(u, xb, dA->narrow(1, c0, len).transpose(1, 2));
        u.mul_(dv);
        // (T, ib, len) @ (len, k) -> (T, ib, k), added as (ib, T, k).
        acc.view({ib, T, k}).add_(at::matmul(u, B_c.t()).permute({1, 0, 2}));
      }
    }
    if (use_w) acc.view({ib, T}).add_((wacc.view({ib, T, d}) * xb.unsqueeze(1)).sum(2));
    out.narrow(1, i0, ib).copy_(acc.view({ib, T, k}).permute({1, 0, 2}));
  }
  if (scale != 1.0) out.mul_(scale);
  return out;
}

// ----------------------------------------------------------------------------- VJP
// dB = s R^T Phi, H = (R B) (.) sigma'(Z), dA = s H^T X, dc = s 1^T H.
// Each m-chunk owns its slices of dA, dc, dB, so on the CPU the chunks run in
// parallel (single-threaded GEMMs on cache-sized (rows x chunk) blocks, one
// barrier; LAZYFAST_TL_RB / LAZYFAST_TL_MC (knobs.h) override the 4096 x 128 block, for
// tuning); on CUDA one stream walks large tiles.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> two_layer_vjp_aten(
    ActivateFn activate, const at::Tensor& x_in, const at::Tensor& A_in, const std::optional<at::Tensor>& c_in,
    const at::Tensor& B_in, double scale, int64_t act, const at::Tensor& r_in) {
  const char* op = "two_layer_vjp";
  check_two_layer_weights(A_in, c_in, B_in, scale, act, op);
  check_two_layer_input(x_in, A_in, "x", op);
  const int64_t n = x_in.size(0), m = A_in.size(0), d = A_in.size(1), k = B_in.size(0);
  TORCH_CHECK(r_in.dim() == 2, "lazyfast: ", op, ": r (cotangent) must be 2-D (n, k), got shape ", r_in.sizes());
  check_like(r_in, A_in, {n, k}, "r (cotangent)", op);
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous(), r = r_in.contiguous();
  std::optional<at::Tensor> c;
  if (c_in.has_value()) c = c_in->contiguous();
  at::Tensor gA = at::zeros({m, d}, x.options()), gc = at::zeros({m}, x.options()), gB = at::zeros({k, m}, x.options());
  if (n == 0 || m == 0) return {gA, gc, gB};
  const bool cpu = x.is_cpu();
  const Knobs kn = knobs();  // one snapshot: the workspace and the CPU block overrides
  const int64_t budget = knob_or(kn.two_layer_workspace_bytes, kTwoLayerWorkspaceBytes) / x.element_size();
  const int64_t rb = cpu ? std::min<int64_t>(n, knob_or(kn.tl_rb, 4096)) : std::min<int64_t>(n, std::max<int64_t>(256, budget / 2 / 64));
  const int64_t mc = cpu ? std::min<int64_t>(m, std::max<int64_t>(16, std::min<int64_t>(knob_or(kn.tl_mc, 128), budget / 2 / rb)))
                         : std::min<int64_t>(m, std::max<int64_t>(64, std::min<int64_t>(4096, budget / 2 / rb)));
  const int64_t nchunks = ceil_div(m, mc);
  const at::Tensor r0 = k == 1 ? r.select(1, 0) : at::Tensor();  // (n,): H = r_i B_j sigma'(z_ij)
  auto run = [&](int64_t cb, int64_t ce) {
    at::Tensor zb = at::empty({rb, mc}, x.options()), hb = at::empty({rb, mc}, x.options());
    for (int64_t ci = cb; ci < ce; ++ci) {
      const int64_t c0 = ci * mc, len = std::min(mc, m - c0);
      at::Tensor gA_c = gA.narrow(0, c0, len), gc_c = gc.narrow(0, c0, len), gB_c = gB.narrow(1, c0, len);
      at::Tensor B_c = B.narrow(1, c0, len);
      for (int64_t i0 = 0; i0 < n; i0 += rb) {
        const int64_t ib = std::min(rb, n - i0);
        at::Tensor xb = x.narrow(0, i0, ib), rbk = r.narrow(0, i0, ib);
        at::Tensor z = zb.narrow(0, 0, ib).narrow(1, 0, len), h = hb.narrow(0, 0, ib).narrow(1, 0, len);
        if (k == 1 && cpu) {
          // One pass: H into h, and the column sums dc += 1^T H, dB += r^T sigma(Z) on the fly
          // (sigma(Z) is never stored); only the dA GEMM reads H again.
          at::mm_out(z, xb, A.narrow(0, c0, len).t());
          ActivateArgs a;
          a.z = z;
          a.bias = opt_narrow(c, 0, c0, len);
          a.w = B_c[0];
          a.rowmul = r0.narrow(0, i0, ib);
          a.deriv = h;
          a.deriv_colsum = gc_c;
          a.phi_colsum = gB_c[0];
          activate(act, a);
          gA_c.addmm_(h.t(), xb);
          continue;
        }
        if (k == 1) {
          chunk_features(activate, act, xb, A.narrow(0, c0, len), opt_narrow(c, 0, c0, len), B_c[0], at::Tensor(), z,
                         z, h, r0.narrow(0, i0, ib));
        } else {
          at::mm_out(h, rbk, B_c);  // R B, turned into H in place
          chunk_features(activate, act, xb, A.narrow(0, c0, len), opt_narrow(c, 0, c0, len), at::Tensor(), h, z, z,
                         h);
        }
        gA_c.addmm_(h.t(), xb);
        gc_c.add_(h.sum(0));
        gB_c.addmm_(rbk.t(), z);
      }
    }
  };
  if (cpu) {
    const at::ThreadLocalState tls;
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      const at::ThreadLocalStateGuard guard(tls);
      run(cb, ce);
    });
  } else {
    run(0, nchunks);
  }
  if (scale != 1.0) {
    gA.mul_(scale);
    gc.mul_(scale);
    gB.mul_(scale);
  }
  return {gA, gc, gB};
}

// ----------------------------------------------------------------------------- Gram
// The elementwise steps of one backend, and how it runs independent tiles.
struct TwoLayerBackend {
  ActivateFn activate = nullptr;
  // out (+ strided views) = s^2 (P + (G + bias) Q): see GramCombineParams. Tensors are 2-D.
  void (*combine)(const at::Tensor& out, const at::Tensor& out2, const at::Tensor& p, const at::Tensor& g,
                  const at::Tensor& q, bool bias, double s2) = nullptr;
  // Finishes block row [i0, i0 + ib) of the symmetric trace Gram: see SymTraceFinalizeParams.
  void (*sym_finalize)(const at::Tensor& out, int64_t i0, int64_t ib, const at::Tensor& g, const at::Tensor& qd,
                       bool bias, double s2) = nullptr;
  // CPU: independent tiles run in at::parallel_for, one single-threaded GEMM each (one
  // barrier per chunk instead of one per GEMM). CUDA: one stream walks the tiles in order,
  // each GEMM large enough for cuBLAS.
  bool parallel_tiles = true;
  // Workspace of the Gram drivers when LAZYFAST_TWO_LAYER_WORKSPACE_BYTES is unset (a set
  // value is used as it is): CPU 128 MiB; CUDA 512 MiB, larger tiles for the GPU's GEMMs.
  int64_t default_workspace_bytes = kTwoLayerWorkspaceBytes;
};

// fn(begin, end) over [0, n): in parallel (carrying the dispatcher state into the workers) or inline.
template <typename F>
void for_tiles(bool parallel, int64_t n, int64_t grain, const F& fn) {
  if (n <= 0) return;
  if (!parallel) {
    fn(int64_t(0), n);
    return;
  }
  const at::ThreadLocalState tls;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(tls);
    fn(begin, end);
  });
}

// Tile order for the triangular work: long and short strips alternate, so the
// contiguous halves at::parallel_for hands to the threads carry equal work.
inline std::vector<int64_t> balanced_order(int64_t nt) {
  std::vector<int64_t> order;
  for (int64_t a = 0, b = nt - 1; a <= b;) {
    order.push_back(a++);
    if (a <= b) order.push_back(b--);
  }
  return order;
}

// Trace mode, X2 = X1: m-chunks outer; per chunk the features of all n rows
// (n x mc). Only the block upper triangle is multiplied: P strips go to the
// upper triangle of `out`, Q strips (transposed) to its strict block-lower
// triangle, the diagonal Q blocks to a small side buffer; a final pass per block
// row forms G and s^2 (P + G (.) Q) and mirrors it (backend sym_finalize).
// Extra memory: 2 n mc + n tb (+ a G strip per tile in flight).
inline void ntk_trace_sym(const TwoLayerBackend& be, const at::Tensor& x, const at::Tensor& A,
                          const std::optional<at::Tensor>& c, const at::Tensor& sw, double scale, int64_t act,
                          at::Tensor& out) {
  const int64_t n = x.size(0), m = A.size(0);
  // Block rows: small enough that the triangle saves work, large enough for efficient GEMMs
  // (CPU: 64..512 rows; CUDA: 256..2048, as cuBLAS wants large tiles).
  const int64_t lo = be.parallel_tiles ? 64 : 256, hi = be.parallel_tiles ? 512 : 2048;
  const int64_t tb = std::min<int64_t>(n, std::max<int64_t>(lo, std::min<int64_t>(hi, ((n / 8 + 63) / 64) * 64)));
  const int64_t nt = ceil_div(n, tb);
  const int64_t mc = two_layer_chunk(m, n, 2, elem_budget(x, be.default_workspace_bytes), 64, 2048);
  at::Tensor fphi = at::empty({n, mc}, x.options()), fd = at::empty({n, mc}, x.options());
  at::Tensor qdiag = at::zeros({nt, tb, tb}, x.options());
  const std::vector<int64_t> order = balanced_order(nt);
  for (int64_t c0 = 0; c0 < m; c0 += mc) {
    const int64_t len = std::min(mc, m - c0);
    at::Tensor phi = fphi.narrow(1, 0, len), dv = fd.narrow(1, 0, len);
    chunk_features(be.activate, act, x, A.narrow(0, c0, len), opt_narrow(c, 0, c0, len), sw.narrow(0, c0, len),
                   at::Tensor(), phi, phi, dv);
    for_tiles(be.parallel_tiles, nt, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t t = order[q], i0 = t * tb, ib = std::min(tb, n - i0), i1 = i0 + ib;
        at::Tensor phi_i = phi.narrow(0, i0, ib), d_i = dv.narrow(0, i0, ib);
        out.narrow(0, i0, ib).narrow(1, i0, n - i0).addmm_(phi_i, phi.narrow(0, i0, n - i0).t());
        qdiag[t].narrow(0, 0, ib).narrow(1, 0, ib).addmm_(d_i, d_i.t());
        if (i1 < n) out.narrow(0, i1, n - i1).narrow(1, i0, ib).addmm_(dv.narrow(0, i1, n - i1), d_i.t());
      }
    });
  }
  const bool bias = c.has_value();
  for_tiles(be.parallel_tiles, nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t t = order[q], i0 = t * tb, ib = std::min(tb, n - i0);
      const at::Tensor g = at::mm(x.narrow(0, i0, ib), x.narrow(0, i0, n - i0).t());  // (ib, n - i0)
      be.sym_finalize(out, i0, ib, g, qdiag[t], bias, scale * scale);
    }
  });
}

// General Gram (X2 given, or full mode): blocks of X1 rows outer, m-chunks
// inner. P accumulates in place (trace) or in a block buffer (full), each
// distinct Q_ab = D1 diag(B_a B_b) D2^T in its own (rb x nc) buffer; the features
// Z, sigma, sigma' of a chunk are formed once for all pairs, G = X1 X2^T once per
// strip of the block for all pairs, and the backend combine writes
// s^2 (delta_ab P + (G + bias) (.) Q_ab) straight into out[.., a, b] and [.., b, a].
// With `sym` (X2 = X1, full mode) a block only computes columns >= its first row and the
// rest is mirrored.
inline at::Tensor two_layer_ntk_general(const TwoLayerBackend& be, const at::Tensor& x1, const at::Tensor& x2,
                                        const at::Tensor& A, const std::optional<at::Tensor>& c,
                                        const at::Tensor& B, const at::Tensor& sw, double scale, int64_t act,
                                        bool full, bool sym) {
  const int64_t n1 = x1.size(0), n2 = x2.size(0), m = A.size(0), k = B.size(0);
  at::Tensor out = full ? at::zeros({n1, n2, k, k}, x1.options()) : at::zeros({n1, n2}, x1.options());
  if (n1 == 0 || n2 == 0) return out;
  const int64_t npair = full ? k * (k + 1) / 2 : 1;
  const int64_t nacc = full ? npair + 1 : npair;  // + P buffer in full mode
  const int64_t budget = elem_budget(x1, be.default_workspace_bytes);
  // Half the workspace for the accumulators, half for the chunk features.
  int64_t rb = std::max<int64_t>(16, budget / 2 / (nacc * std::max<int64_t>(n2, 1)));
  if (sym) rb = std::min(rb, std::max<int64_t>(64, ceil_div(n1, 4)));
  rb = std::min(rb, n1);
  const int64_t mc = two_layer_chunk(m, rb + n2, 3, budget / 2, 64, 2048);
  // G strips: 256 rows per thread on the CPU (cache), the whole block on CUDA.
  const int64_t gsub = be.parallel_tiles ? 256 : rb;
  at::Tensor phi1b = at::empty({rb, mc}, x1.options()), d1b = at::empty({rb, mc}, x1.options());
  at::Tensor phi2b = at::empty({n2, mc}, x1.options()), d2b = at::empty({n2, mc}, x1.options());
  at::Tensor tmpb = full ? at::empty({rb, mc}, x1.options()) : at::Tensor();
  at::Tensor accb = at::empty({nacc, rb, n2}, x1.options());
  at::Tensor wpair;  // (npair, m): B_a * B_b for a <= b
  if (full) {
    wpair = at::empty({npair, m}, x1.options());
    int64_t p = 0;
    for (int64_t a = 0; a < k; ++a)
      for (int64_t b = a; b < k; ++b) wpair[p++].copy_(B[a] * B[b]);
  }
  const bool bias = c.has_value();
  const double s2 = scale * scale;
  for (int64_t i0 = 0; i0 < n1; i0 += rb) {
    const int64_t ib = std::min(rb, n1 - i0);
    const int64_t j0 = sym ? i0 : 0, nc = n2 - j0;
    at::Tensor x1b = x1.narrow(0, i0, ib), x2b = x2.narrow(0, j0, nc);
    at::Tensor acc = accb.narrow(1, 0, ib).narrow(2, 0, nc);
    acc.zero_();
    at::Tensor pacc = full ? acc[npair] : out.narrow(0, i0, ib).narrow(1, j0, nc);
    for (int64_t c0 = 0; c0 < m; c0 += mc) {
      const int64_t len = std::min(mc, m - c0);
      at::Tensor A_c = A.narrow(0, c0, len), c_c = opt_narrow(c, 0, c0, len);
      at::Tensor w_c = full ? at::Tensor() : sw.narrow(0, c0, len);
      at::Tensor phi1 = phi1b.narrow(0, 0, ib).narrow(1, 0, len), d1 = d1b.narrow(0, 0, ib).narrow(1, 0, len);
      at::Tensor phi2 = phi2b.narrow(0, 0, nc).narrow(1, 0, len), d2 = d2b.narrow(0, 0, nc).narrow(1, 0, len);
      chunk_features(be.activate, act, x2b, A_c, c_c, w_c, at::Tensor(), phi2, phi2, d2);
      // Rows of the block split over the threads (CPU), single-threaded GEMMs: one barrier.
      for_tiles(be.parallel_tiles, ib, 64, [&](int64_t r0, int64_t r1) {
        const int64_t rl = r1 - r0;
        at::Tensor p1 = phi1.narrow(0, r0, rl), q1 = d1.narrow(0, r0, rl);
        chunk_features(be.activate, act, x1b.narrow(0, r0, rl), A_c, c_c, w_c, at::Tensor(), p1, p1, q1);
        pacc.narrow(0, r0, rl).addmm_(p1, phi2.t());
        if (!full) {
          acc[0].narrow(0, r0, rl).addmm_(q1, d2.t());
        } else {
          at::Tensor tmp = tmpb.narrow(0, r0, rl).narrow(1, 0, len);
          for (int64_t p = 0; p < npair; ++p) {
            at::mul_out(tmp, q1, wpair[p].narrow(0, c0, len));
            acc[p].narrow(0, r0, rl).addmm_(tmp, d2.t());
          }
        }
      });
    }
    at::Tensor o = out.narrow(0, i0, ib).narrow(1, j0, nc);  // (ib, nc) or (ib, nc, k, k)
    for_tiles(be.parallel_tiles, ib, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t s0 = r0; s0 < r1; s0 += gsub) {
        const int64_t sl = std::min(gsub, r1 - s0);
        const at::Tensor g = at::mm(x1b.narrow(0, s0, sl), x2b.t());  // once for all pairs
        if (!full) {
          at::Tensor ps = pacc.narrow(0, s0, sl);
          be.combine(ps, at::Tensor(), ps, g, acc[0].narrow(0, s0, sl), bias, s2);
          continue;
        }
        at::Tensor os = o.narrow(0, s0, sl);
        int64_t p = 0;
        for (int64_t a = 0; a < k; ++a)
          for (int64_t b = a; b < k; ++b, ++p)
            be.combine(os.select(3, b).select(2, a), a == b ? at::Tensor() : os.select(3, a).select(2, b),
                       a == b ? pacc.narrow(0, s0, sl) : at::Tensor(), g, acc[p].narrow(0, s0, sl), bias, s2);
      }
    });
  }
  if (sym) {
    // Diagonal blocks exactly symmetric (up to rounding only, from the GEMMs).
    for (int64_t i0 = 0; i0 < n1; i0 += rb) {
      const int64_t ib = std::min(rb, n1 - i0);
      at::Tensor blk = out.narrow(0, i0, ib).narrow(1, i0, ib);
      blk.copy_((blk + (full ? blk.permute({1, 0, 3, 2}) : blk.t())).mul_(0.5));
    }
    // Fill the blocks left of each row block: Theta(x_i, x_j)_ab = Theta(x_j, x_i)_ba.
    for (int64_t i0 = rb; i0 < n1; i0 += rb) {
      const int64_t ib = std::min(rb, n1 - i0);
      at::Tensor dst = out.narrow(0, i0, ib).narrow(1, 0, i0);
      at::Tensor src = out.narrow(0, 0, i0).narrow(1, i0, ib);
      dst.copy_(full ? src.permute({1, 0, 3, 2}) : src.t());
    }
  }
  return out;
}

// (n1, d), (n2, d) or None -> (n1, n2) trace or (n1, n2, k, k) full. The caller (backend
// entry point) has set the device guard and the matmul precision.
inline at::Tensor two_layer_ntk_aten(const TwoLayerBackend& be, const at::Tensor& x1_in,
                                     const std::optional<at::Tensor>& x2_in, const at::Tensor& A_in,
                                     const std::optional<at::Tensor>& c_in, const at::Tensor& B_in, double scale,
                                     int64_t act, bool full) {
  const char* op = "two_layer_ntk";
  check_two_layer_weights(A_in, c_in, B_in, scale, act, op);
  check_two_layer_input(x1_in, A_in, "x1", op);
  if (x2_in.has_value()) check_two_layer_input(*x2_in, A_in, "x2", op);
  const at::Tensor x1 = x1_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous();
  std::optional<at::Tensor> c;
  if (c_in.has_value()) c = c_in->contiguous();
  // Trace weights: sigma'(z_j) * sqrt(mean_a B_aj^2) on both sides gives (1/k) sum_a Q_aa.
  const at::Tensor sw = full ? at::Tensor() : (B * B).mean(0).sqrt_().contiguous();
  if (!x2_in.has_value()) {
    if (!full) {
      at::Tensor out = at::zeros({x1.size(0), x1.size(0)}, x1.options());
      if (x1.size(0) == 0) return out;
      ntk_trace_sym(be, x1, A, c, sw, scale, act, out);
      return out;
    }
    return two_layer_ntk_general(be, x1, x1, A, c, B, sw, scale, act, full, /*sym=*/true);
  }
  const at::Tensor x2 = x2_in->contiguous();
  return two_layer_ntk_general(be, x1, x2, A, c, B, sw, scale, act, full, /*sym=*/false);
}

// ----------------------------------------------------------------------------- NTK . v
// out = Theta(X1, X2) v = J1 (J2^T v), fused per m-chunk: the chunk of the VJP
// (gA_c, gc_c, gB_c) is consumed by the JVP over X1 at once, so not even a
// parameter-sized buffer is needed.
inline at::Tensor two_layer_ntk_vp_aten(ActivateFn activate, const at::Tensor& x1_in,
                                        const std::optional<at::Tensor>& x2_in, const at::Tensor& A_in,
                                        const std::optional<at::Tensor>& c_in, const at::Tensor& B_in, double scale,
                                        int64_t act, const at::Tensor& v_in) {
  const char* op = "two_layer_ntk_vp";
  check_two_layer_weights(A_in, c_in, B_in, scale, act, op);
  check_two_layer_input(x1_in, A_in, "x1", op);
  if (x2_in.has_value()) check_two_layer_input(*x2_in, A_in, "x2", op);
  const at::Tensor& x2r = x2_in.has_value() ? *x2_in : x1_in;
  const int64_t n1 = x1_in.size(0), n2 = x2r.size(0), m = A_in.size(0), d = A_in.size(1), k = B_in.size(0);
  TORCH_CHECK(v_in.dim() == 2, "lazyfast: ", op, ": v must be 2-D (n2, k), got shape ", v_in.sizes());
  check_like(v_in, A_in, {n2, k}, "v", op);
  const at::Tensor x1 = x1_in.contiguous(), x2 = x2r.contiguous(), A = A_in.contiguous(), B = B_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  std::optional<at::Tensor> c;
  if (c_in.has_value()) c = c_in->contiguous();
  at::Tensor out = at::zeros({n1, k}, x1.options());
  if (n1 == 0 || n2 == 0 || m == 0) return out;
  const int64_t budget = elem_budget(x1);
  const int64_t rb = std::min<int64_t>(std::max(n1, n2), std::max<int64_t>(256, budget / 2 / 64));
  const int64_t mc = std::min<int64_t>(m, std::max<int64_t>(64, std::min<int64_t>(4096, budget / 3 / rb)));
  at::Tensor zb = at::empty({rb, mc}, x1.options()), hb = at::empty({rb, mc}, x1.options());
  at::Tensor db = at::empty({rb, mc}, x1.options());
  at::Tensor gA = at::empty({mc, d}, x1.options()), gc = at::empty({mc}, x1.options());
  at::Tensor gB = at::empty({k, mc}, x1.options());
  const bool same = !x2_in.has_value() && n1 <= rb;  // one block: reuse the chunk features of X
  for (int64_t c0 = 0; c0 < m; c0 += mc) {
    const int64_t len = std::min(mc, m - c0);
    at::Tensor A_c = A.narrow(0, c0, len), c_c = opt_narrow(c, 0, c0, len), B_c = B.narrow(1, c0, len);
    at::Tensor gA_c = gA.narrow(0, 0, len), gc_c = gc.narrow(0, 0, len), gB_c = gB.narrow(1, 0, len);
    gA_c.zero_();
    gc_c.zero_();
    gB_c.zero_();
    // VJP over X2 (cotangent v), restricted to this chunk.
    for (int64_t i0 = 0; i0 < n2; i0 += rb) {
      const int64_t ib = std::min(rb, n2 - i0);
      at::Tensor xb = x2.narrow(0, i0, ib), vb = v.narrow(0, i0, ib);
      at::Tensor z = zb.narrow(0, 0, ib).narrow(1, 0, len), h = hb.narrow(0, 0, ib).narrow(1, 0, len);
      at::mm_out(h, vb, B_c);
      if (same) {
        at::Tensor dv = db.narrow(0, 0, ib).narrow(1, 0, len);
        chunk_features(activate, act, xb, A_c, c_c, at::Tensor(), at::Tensor(), z, z, dv);
        h.mul_(dv);
      } else {
        chunk_features(activate, act, xb, A_c, c_c, at::Tensor(), h, z, z, h);
      }
      gA_c.addmm_(h.t(), xb);
      if (c.has_value()) gc_c.add_(h.sum(0));
      gB_c.addmm_(vb.t(), z);
    }
    // JVP over X1 along (gA_c, gc_c, gB_c); the scale s of the VJP is applied at the end (s^2 total).
    for (int64_t i0 = 0; i0 < n1; i0 += rb) {
      const int64_t ib = std::min(rb, n1 - i0);
      at::Tensor xb = x1.narrow(0, i0, ib);
      at::Tensor z = zb.narrow(0, 0, ib).narrow(1, 0, len), u = hb.narrow(0, 0, ib).narrow(1, 0, len);
      at::Tensor dv = db.narrow(0, 0, ib).narrow(1, 0, len);
      if (!same) chunk_features(activate, act, xb, A_c, c_c, at::Tensor(), at::Tensor(), z, z, dv);
      // U = X gA^T (+ gc: without a hidden bias there is no bias parameter to move).
      if (c.has_value()) {
        at::addmm_out(u, gc_c.unsqueeze(0), xb, gA_c.t());
      } else {
        at::mm_out(u, xb, gA_c.t());
      }
      u.mul_(dv);
      at::Tensor ob = out.narrow(0, i0, ib);
      ob.addmm_(z, gB_c.t());
      ob.addmm_(u, B_c.t());
    }
  }
  out.mul_(scale * scale);
  return out;
}

}  // namespace lazyfast
