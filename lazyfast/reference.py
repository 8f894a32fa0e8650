"""Pure-PyTorch references: the fallback, the test oracle and the benchmark baselines.

Everything here works for any ``nn.Module`` mapping a batch ``(n, ...)`` to
``(n, k)`` (or ``(n,)``, read as k = 1), differentiating with respect to the
module's trainable parameters (``requires_grad=True``); frozen parameters and
buffers are constants. Fast paths in lazyfast are tested against these
functions, and these are tested against :func:`ntk_oracle`.

Notation: Θ(x, x')_{ab} = ⟨∂f_a(x)/∂w, ∂f_b(x')/∂w⟩. ``mode="full"`` returns
(n1, n2, k, k); ``mode="trace"`` returns (1/k)·Σ_a Θ_aa, shape (n1, n2).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp as _func_jvp, vjp as _func_vjp, vmap

Params = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- functional view
def functional_model(model: nn.Module) -> Tuple[Callable[[Params, torch.Tensor], torch.Tensor], Params]:
    """Returns ``(f, params)`` with ``f(params, x) -> (n, k)`` and ``params`` the
    detached trainable parameters of ``model`` (name → tensor)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True): its tangent kernel is empty")

    def f(p: Params, x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (x,), strict=False)
        return out.reshape(x.shape[0], -1)

    return f, params


def _chunks(n: int, size: Optional[int]):
    size = n if not size else size
    for s in range(0, n, max(size, 1)):
        yield s, min(s + size, n)


def _out_dim(f, params, x) -> int:
    with torch.no_grad():
        return f(params, x[:1]).shape[1]


# ----------------------------------------------------------------------------- Jacobians
def jacobian(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-sample Jacobians by ``vmap(jacrev)``: name → (n, k, *param.shape)."""
    f, params = functional_model(model)

    def single(p, xi):
        return f(p, xi.unsqueeze(0))[0]

    return vmap(jacrev(single), (None, 0))(params, x)


def _contract(j1: Dict[str, torch.Tensor], j2: Dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    out = None
    for name, a in j1.items():
        b = j2[name]
        a = a.reshape(a.shape[0], a.shape[1], -1)
        b = b.reshape(b.shape[0], b.shape[1], -1)
        if mode == "full":
            term = torch.einsum("iap,jbp->ijab", a, b)
        else:
            term = torch.einsum("iap,jap->ij", a, b) / a.shape[1]
        out = term if out is None else out + term
    return out


def ntk_jacobian(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
                 chunk_size: Optional[int] = None) -> torch.Tensor:
    """eNTK by Jacobian contraction (the ``torch.func`` NTK tutorial's method).

    Per-sample Jacobians are formed ``chunk_size`` samples at a time (all at once when
    None), so peak memory is about ``2·chunk_size·k·P`` numbers.
    Shapes: x1 (n1, ...), x2 (n2, ...) → (n1, n2) for trace, (n1, n2, k, k) for full.
    """
    same = x2 is None
    x2 = x1 if same else x2
    f, params = functional_model(model)
    k = _out_dim(f, params, x1) if x1.shape[0] else _out_dim(f, params, x2) if x2.shape[0] else 1
    n1, n2 = x1.shape[0], x2.shape[0]
    shape = (n1, n2) if mode == "trace" else (n1, n2, k, k)
    out = torch.zeros(shape, dtype=next(iter(params.values())).dtype, device=x1.device)
    if n1 == 0 or n2 == 0:
        return out
    for s1, e1 in _chunks(n1, chunk_size):
        j1 = jacobian(model, x1[s1:e1])
        for s2, e2 in _chunks(n2, chunk_size):
            j2 = j1 if (same and (s1, e1) == (s2, e2)) else jacobian(model, x2[s2:e2])
            out[s1:e1, s2:e2] = _contract(j1, j2, mode)
    return out


def ntk_ntkvp(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
              chunk_size: Optional[int] = None) -> torch.Tensor:
    """eNTK by NTK-vector products (the tutorial's second method): one VJP over x2 and
    one JVP over x1 per column, ``chunk_size`` columns (unit cotangents) at a time."""
    x2 = x1 if x2 is None else x2
    f, params = functional_model(model)
    k = _out_dim(f, params, x1) if x1.shape[0] else _out_dim(f, params, x2) if x2.shape[0] else 1
    n1, n2 = x1.shape[0], x2.shape[0]
    dtype = next(iter(params.values())).dtype
    if n1 == 0 or n2 == 0:
        return torch.zeros((n1, n2) if mode == "trace" else (n1, n2, k, k), dtype=dtype, device=x1.device)
    _, vjp_fn = _func_vjp(lambda p: f(p, x2), params)

    def column(e):
        (g,) = vjp_fn(e)
        return _func_jvp(lambda p: f(p, x1), (params,), (g,))[1]

    eye = torch.eye(n2 * k, dtype=dtype, device=x1.device)
    cols = []
    for s, e in _chunks(n2 * k, chunk_size):
        cols.append(vmap(column)(eye[s:e].reshape(e - s, n2, k)))  # (c, n1, k)
    res = torch.cat(cols).reshape(n2, k, n1, k)  # res[j, b, i, a] = Θ(x1_i, x2_j)_{ab}
    full = res.permute(2, 0, 3, 1)
    if mode == "full":
        return full.contiguous()
    return torch.diagonal(full, dim1=2, dim2=3).mean(-1)


# ----------------------------------------------------------------------------- JVP / VJP / NTK·v
def _full_tangents(params: Params, tangents: Dict[str, torch.Tensor]) -> Tuple[Params, int]:
    if not isinstance(tangents, dict) or not tangents:
        raise TypeError("tangents must be a non-empty dict: parameter name -> tensor of shape (T, *param.shape)")
    unknown = sorted(set(tangents) - set(params))
    if unknown:
        raise ValueError(f"tangents has names that are not trainable parameters of the model: {unknown}; "
                         f"expected a subset of {sorted(params)}")
    T = None
    for name, t in tangents.items():
        p = params[name]
        if not isinstance(t, torch.Tensor) or t.dim() != p.dim() + 1 or t.shape[1:] != p.shape:
            raise ValueError(f"tangents[{name!r}] must have shape (T, {', '.join(map(str, p.shape))}), "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype != p.dtype or t.device != p.device:
            raise TypeError(f"tangents[{name!r}] must have the parameter's dtype/device ({p.dtype}, {p.device}), "
                            f"got ({t.dtype}, {t.device})")
        if T is None:
            T = t.shape[0]
        elif t.shape[0] != T:
            raise ValueError(f"tangents[{name!r}] has {t.shape[0]} tangents but others have {T}")
    full = {n: tangents[n] if n in tangents else torch.zeros((T,) + p.shape, dtype=p.dtype, device=p.device)
            for n, p in params.items()}
    return full, T


def jvp(model: nn.Module, x: torch.Tensor, tangents: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Batched Jacobian-vector products J(w, x)·V for T tangents at once.

    ``tangents``: parameter name → (T, *param.shape); missing names count as zero.
    Returns (T, n, k).
    """
    f, params = functional_model(model)
    full, T = _full_tangents(params, tangents)
    if T == 0 or x.shape[0] == 0:
        k = _out_dim(f, params, x) if x.shape[0] else 1
        return torch.zeros((T, x.shape[0], k), dtype=x.dtype, device=x.device)

    def single(t):
        return _func_jvp(lambda p: f(p, x), (params,), (t,))[1]

    return vmap(single)(full)


def vjp(model: nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Vector-Jacobian product J(w, x)ᵀ·R for a cotangent R of shape (n, k) → name → grad."""
    f, params = functional_model(model)
    _, vjp_fn = _func_vjp(lambda p: f(p, x), params)
    (g,) = vjp_fn(cotangent)
    return g


def ntk_vp(model: nn.Module, x1: torch.Tensor, v: torch.Tensor, x2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Θ(x1, x2)·v without forming Θ: ``out[i, a] = Σ_{j,b} Θ(x1_i, x2_j)_{ab} v[j, b]``.

    One VJP over x2 then one JVP over x1. v: (n2, k) → (n1, k).
    """
    x2 = x1 if x2 is None else x2
    f, params = functional_model(model)
    _, vjp_fn = _func_vjp(lambda p: f(p, x2), params)
    (g,) = vjp_fn(v)
    return _func_jvp(lambda p: f(p, x1), (params,), (g,))[1]


# ----------------------------------------------------------------------------- generic Gram
def gram(j1: torch.Tensor, j2: Optional[torch.Tensor] = None, *, accumulate_f64: bool = False) -> torch.Tensor:
    """J1 J2ᵀ for flattened Jacobians (n1, P), (n2, P) → (n1, n2)."""
    j2 = j1 if j2 is None else j2
    if accumulate_f64 and j1.dtype == torch.float32:
        return (j1.double() @ j2.double().T).to(j1.dtype)
    return j1 @ j2.T


# ----------------------------------------------------------------------------- oracle
def per_example_gradients(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Brute-force oracle: one ``torch.autograd.grad`` per sample and output,
    flattened over the trainable parameters → (n, k, P). Tiny sizes only."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        per_out = []
        for a in range(out.shape[0]):
            grads = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            per_out.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                      for g, p in zip(grads, params)]))
        rows.append(torch.stack(per_out))
    if not rows:
        return torch.zeros((0, 1, sum(p.numel() for p in params)), dtype=params[0].dtype, device=params[0].device)
    return torch.stack(rows)


def ntk_oracle(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace") -> torch.Tensor:
    """eNTK from per-example autograd gradients dotted pairwise (independent of torch.func)."""
    g1 = per_example_gradients(model, x1)
    g2 = g1 if x2 is None else per_example_gradients(model, x2)
    full = torch.einsum("iap,jbp->ijab", g1, g2)
    if mode == "full":
        return full
    return torch.diagonal(full, dim1=2, dim2=3).mean(-1)


# ============================================================================= two-layer network
# Dense GEMM formulation of the two-layer network f(x) = s·B σ(A x + c) (DESIGN.md §1.1).
# It materializes the (n, m) matrices Φ = σ(Z) and Σ' = σ'(Z): the best pure-PyTorch
# baseline for the fused ops of lazyfast.two_layer, their fallback when no kernel is
# compiled, and (tested against ntk_oracle) their reference.
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
    from lazyfast.models import activation_fn

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
