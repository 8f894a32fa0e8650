// Torch-side drivers of the two-layer JVP, VJP and NTK.v, shared by the CPU and
// CUDA backends (the Gram has a driver per backend: two_layer_cpu.cpp and the
// fused kernel of two_layer_cuda.cpp).
//
// Every op is a loop over m-chunks of neurons (and, where needed, blocks of
// rows) made of ATen GEMMs on bounded tiles plus one elementwise "activate"
// step (lazyfast/two_layer.h) that each backend implements. Extra memory is
// O(rows * chunk), never an n x m buffer for the whole batch.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "checks.h"
#include "lazyfast/activations.h"
#include "lazyfast/two_layer.h"

namespace lazyfast {

// Workspace the drivers may allocate besides their outputs (bytes): 128 MiB, or
// LAZYFAST_TWO_LAYER_WORKSPACE_BYTES (read per call; tests shrink it to force
// many chunks and row blocks).
constexpr int64_t kTwoLayerWorkspaceBytes = int64_t(128) << 20;

inline int64_t two_layer_env_int(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  if (env != nullptr && *env != '\0') {
    const long long v = std::atoll(env);
    if (v > 0) return static_cast<int64_t>(v);
  }
  return fallback;
}

inline int64_t two_layer_workspace_bytes() {
  const char* env = std::getenv("LAZYFAST_TWO_LAYER_WORKSPACE_BYTES");
  if (env != nullptr && *env != '\0') {
    const long long v = std::atoll(env);
    if (v > 0) return static_cast<int64_t>(v);
  }
  return kTwoLayerWorkspaceBytes;
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
inline int64_t elem_budget(const at::Tensor& t) { return two_layer_workspace_bytes() / t.element_size(); }

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
// barrier; LAZYFAST_TL_RB / LAZYFAST_TL_MC override the 4096 x 128 block, for
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
  const int64_t budget = elem_budget(x);
  const int64_t rb = cpu ? std::min<int64_t>(n, two_layer_env_int("LAZYFAST_TL_RB", 4096)) : std::min<int64_t>(n, std::max<int64_t>(256, budget / 2 / 64));
  const int64_t mc = cpu ? std::min<int64_t>(m, std::max<int64_t>(16, std::min<int64_t>(two_layer_env_int("LAZYFAST_TL_MC", 128), budget / 2 / rb)))
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
