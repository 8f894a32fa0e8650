"""The pure-PyTorch formulas the compiled ops fall back to where no kernel serves the inputs (a device or
dtype not built): the dense GEMM formulation of the two-layer ops, the Hadamard-Gram sum, the Gram of
flattened Jacobians. :mod:`lazyfast.reference` re-exports them as the dense baselines of the benchmarks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from lazyfast.models import activation_fn


# ----------------------------------------------------------------------------- generic Gram
def gram(j1: torch.Tensor, j2: Optional[torch.Tensor] = None, *, accumulate_f64: bool = False) -> torch.Tensor:
    """J1 J2ᵀ for flattened Jacobians (n1, P), (n2, P) → (n1, n2)."""
    j2 = j1 if j2 is None else j2
    if accumulate_f64 and j1.dtype == torch.float32:
        return (j1.double() @ j2.double().T).to(j1.dtype)
    return j1 @ j2.T



# ============================================================================= two-layer network
# Dense GEMM formulation of the two-layer network f(x) = s·B σ(A x + c) (docs/engine.md).
# It materializes the (n, m) matrices Φ = σ(Z) and Σ' = σ'(Z): the best pure-PyTorch
# baseline for the fused two-layer ops, their fallback when no kernel is compiled, and
# (tested against reference.ntk_oracle) their reference.
def activation_deriv(name: str, z: torch.Tensor) -> torch.Tensor:
    """σ'(z) for an activation name of :data:`lazyfast.models.ACTIVATIONS` (ReLU'(0) = 0)."""
    if name == "identity":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "tanh":
        return 1 - torch.tanh(z) ** 2
    if name == "gelu":
        return 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * torch.exp(-0.5 * z * z)
    if name == "softplus":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation {name!r}")


def _two_layer_features(x, A, c, activation):
    z = x @ A.T if c is None else torch.addmm(c, x, A.T)
    return activation_fn(activation)(z), activation_deriv(activation, z)


def two_layer_ntk_dense(x1: torch.Tensor, x2: Optional[torch.Tensor], A: torch.Tensor, c: Optional[torch.Tensor],
                        B: torch.Tensor, scale: float, activation: str, mode: str = "trace") -> torch.Tensor:
    """Two-layer eNTK from dense features:
    Θ_ab = s² [δ_ab Φ1Φ2ᵀ + (X1X2ᵀ + 1_bias) ⊙ (Σ'1 diag(B_a ⊙ B_b) Σ'2ᵀ)].

    Shapes: x1 (n1, d), x2 (n2, d) or None, A (m, d), c (m,) or None, B (k, m)
    → (n1, n2) for ``mode="trace"``, (n1, n2, k, k) for ``"full"``.
    """
    phi1, d1 = _two_layer_features(x1, A, c, activation)
    if x2 is None:
        x2, phi2, d2 = x1, phi1, d1
    else:
        phi2, d2 = _two_layer_features(x2, A, c, activation)
    g = x1 @ x2.T
    if c is not None:
        g += 1
    s2 = float(scale) ** 2
    if mode == "trace":
        w = (B * B).mean(0)
        q = (d1 * w) @ d2.T
        return (phi1 @ phi2.T).add_(q.mul_(g)).mul_(s2)
    k = B.shape[0]
    q = torch.einsum("iam,jbm->ijab", d1.unsqueeze(1) * B, d2.unsqueeze(1) * B)
    q.mul_(g[:, :, None, None])
    q += (phi1 @ phi2.T)[:, :, None, None] * torch.eye(k, dtype=q.dtype, device=q.device)
    return q.mul_(s2)


def two_layer_jvp_dense(x: torch.Tensor, A: torch.Tensor, c: Optional[torch.Tensor], B: torch.Tensor, scale: float,
                        activation: str, dA: Optional[torch.Tensor], dc: Optional[torch.Tensor],
                        dB: Optional[torch.Tensor]) -> torch.Tensor:
    """Batched JVP s·[Φ dBᵀ + (Σ' ⊙ (X dAᵀ + dc)) Bᵀ] for T tangents; holds (T, n, m).

    Shapes: dA (T, m, d), dc (T, m), dB (T, k, m), each optional (zero) → (T, n, k).
    """
    T = next(t.shape[0] for t in (dA, dc, dB) if t is not None)
    phi, dsig = _two_layer_features(x, A, c, activation)
    out = torch.zeros((T, x.shape[0], B.shape[0]), dtype=x.dtype, device=x.device)
    if dA is not None or dc is not None:
        u = torch.matmul(x, dA.transpose(1, 2)) if dA is not None else 0
        if dc is not None:
            u = u + dc[:, None, :]
        out += torch.matmul(u * dsig, B.T)
    if dB is not None:
        out += torch.matmul(phi, dB.transpose(1, 2))
    return out.mul_(float(scale))


def two_layer_vjp_dense(x: torch.Tensor, A: torch.Tensor, c: Optional[torch.Tensor], B: torch.Tensor, scale: float,
                        activation: str, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VJP of a cotangent r (n, k): dA = s Hᵀ X, dc = s 1ᵀH, dB = s rᵀ Φ with H = (r B) ⊙ Σ'.

    Returns (dA (m, d), dc (m,), dB (k, m)).
    """
    phi, dsig = _two_layer_features(x, A, c, activation)
    h = (r @ B).mul_(dsig)
    s = float(scale)
    return (h.T @ x).mul_(s), h.sum(0).mul_(s), (r.T @ phi).mul_(s)


def two_layer_ntk_vp_dense(x1: torch.Tensor, x2: Optional[torch.Tensor], A: torch.Tensor, c: Optional[torch.Tensor],
                           B: torch.Tensor, scale: float, activation: str, v: torch.Tensor) -> torch.Tensor:
    """Θ(x1, x2)·v = J1 (J2ᵀ v): one dense VJP over x2, one dense JVP over x1. v (n2, k) → (n1, k)."""
    gA, gc, gB = two_layer_vjp_dense(x1 if x2 is None else x2, A, c, B, scale, activation, v)
    return two_layer_jvp_dense(x1, A, c, B, scale, activation, gA[None], None if c is None else gc[None], gB[None])[0]



# ----------------------------------------------------------------------------- Hadamard-Gram sum
def hadamard_gram_sum(d1, h1, d2=None, h2=None, h_scale=None, beta=None, *, mode: str = "trace") -> torch.Tensor:
    """Σ_l (D1_l D2_lᵀ) ⊙ (γ_l H1_l H2_lᵀ + β_l), the sum of Hadamard products of Grams.

    d1[l]: (k, n1, w_l); h1[l]: (n1, v_l); d2/h2 likewise with n2, or None for the
    first pair. ``mode="full"`` → (n1, n2, k, k) with out[i, j, a, b] using D1[a], D2[b];
    ``"trace"`` → (n1, n2) = (1/k) Σ_a out[:, :, a, a]. One dense n1×n2 Gram per layer.
    """
    d2 = d1 if d2 is None else d2
    h2 = h1 if h2 is None else h2
    L = len(d1)
    h_scale = [1.0] * L if h_scale is None else h_scale
    beta = [0.0] * L if beta is None else beta
    k = d1[0].shape[0]
    out = None
    for l in range(L):
        mh = h_scale[l] * (h1[l] @ h2[l].T) + beta[l]
        if mode == "full":
            gd = torch.einsum("aiw,bjw->ijab", d1[l], d2[l])
            term = gd * mh[:, :, None, None]
        else:
            kw = d1[l].shape[0] * d1[l].shape[2]
            a = d1[l].permute(1, 0, 2).reshape(d1[l].shape[1], kw)
            b = d2[l].permute(1, 0, 2).reshape(d2[l].shape[1], kw)
            term = (a @ b.T) * mh / k
        out = term if out is None else out + term
    return out
