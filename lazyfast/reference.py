"""Pure-PyTorch references: the test oracle, the references and the benchmark baselines.

The production paths live in :mod:`lazyfast._engine` (the structured engine, the generic path, the
products); the torch.func JVP / VJP / NTK·v baselines are the products path's own functions.

Everything here works for any ``nn.Module`` mapping a batch ``(n, ...)`` to
``(n, k)`` (or ``(n,)``, read as k = 1), differentiating with respect to the
module's trainable parameters (``requires_grad=True``); frozen parameters and
buffers are constants. Fast paths in lazyfast are tested against these
functions, and these are tested against :func:`ntk_oracle`.

Notation: Θ(x, x')_{ab} = ⟨∂f_a(x)/∂w, ∂f_b(x')/∂w⟩. ``mode="full"`` returns
(n1, n2, k, k); ``mode="trace"`` returns (1/k)·Σ_a Θ_aa, shape (n1, n2).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp as _func_jvp, vmap

from lazyfast._engine.generic import functional_model
# The torch.func JVP / VJP / NTK·v users write (vmap(jvp), vjp, vjp then jvp) are the baselines of the
# fused products; the engine's products path runs the same code, so it is defined once, there.
from lazyfast._engine.products import _out_dim, check_tangents, jvp, ntk_vp, vjp  # noqa: F401 (baselines)
# The dense formulas the compiled ops fall back to are the benchmarks' dense baselines: defined once, there.
from lazyfast._ops.dense import (activation_deriv, gram, hadamard_gram_sum, two_layer_jvp_dense,  # noqa: F401
                                 two_layer_ntk_dense, two_layer_ntk_vp_dense, two_layer_vjp_dense)
from lazyfast.models import activation_fn, check_activation

Params = Dict[str, torch.Tensor]


def _chunks(n: int, size: Optional[int]):
    size = n if not size else size
    for s in range(0, n, max(size, 1)):
        yield s, min(s + size, n)


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


# ============================================================================= structured (layerwise) MLP eNTK
# Θ(x, x')_ab = Σ_l ⟨δ_l,a(x), δ_l,b(x')⟩ · (γ_l ⟨h_{l−1}(x), h_{l−1}(x')⟩ + β_l)   (docs/engine.md)
# with δ_l = ∂f/∂z_l, γ_l = weight_multiplier_l² and β_l = 1 for a bias, 0 without.
def activation_derivative(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """σ' as a function, for an activation name of :mod:`lazyfast.models` (ReLU'(0) = 0, as autograd)."""

    check_activation(name)
    return lambda z: activation_deriv(name, z)


def mlp_factors(mlp, x: torch.Tensor):
    """Per-layer factors of the structured eNTK of a :class:`lazyfast.models.MLP`.

    One forward pass storing the layer inputs h_{l−1} and σ'(z_l), then the k
    backward passes for δ_l = ∂f/∂z_l vectorized as one batched GEMM chain.

    Returns ``(ds, hs, gammas, betas)``: per layer l (input layer first),
    ``ds[l]`` (k, n, w_l) = δ_l for every output a, ``hs[l]`` (n, fan_in_l) = h_{l−1},
    ``gammas[l]`` = weight_multiplier_l² (the gradient w.r.t. W_l is mult·δ_l h_{l−1}ᵀ),
    ``betas[l]`` = 1.0 with a bias, else 0.0.
    """

    act = activation_fn(mlp.activation)
    dact = activation_derivative(mlp.activation)
    layers = list(mlp.layers)
    L = len(layers)
    hs, dacts = [], []
    h = x
    for i, layer in enumerate(layers):
        hs.append(h)
        if i < L - 1:
            z = _dense_forward(h, layer.weight, layer.bias, layer.weight_multiplier)
            dacts.append(dact(z))
            h = act(z)
    k = layers[-1].weight.shape[0]
    n = x.shape[0]
    ds = [None] * L
    # δ of the output layer is the identity: ∂f_a/∂z_L = e_a for every sample.
    ds[L - 1] = torch.eye(k, dtype=x.dtype, device=x.device).unsqueeze(1).expand(k, n, k)
    for i in range(L - 2, -1, -1):
        nxt = layers[i + 1]
        if i == L - 2:
            # δ_{L−1,a} = mult·W_L[a, :] ⊙ σ'(z): a broadcast, no GEMM needed.
            back = (nxt.weight * nxt.weight_multiplier).unsqueeze(1)  # (k, 1, w)
        else:
            w_next = nxt.weight.shape[0]
            back = (ds[i + 1].reshape(-1, w_next) @ nxt.weight).reshape(k, n, -1)
            if nxt.weight_multiplier != 1.0:
                back.mul_(nxt.weight_multiplier)
            ds[i] = back.mul_(dacts[i].unsqueeze(0))
            continue
        ds[i] = back * dacts[i].unsqueeze(0)
    gammas = [float(layer.weight_multiplier) ** 2 for layer in layers]
    betas = [1.0 if layer.bias is not None else 0.0 for layer in layers]
    return ds, hs, gammas, betas


def _dense_forward(h, weight, bias, multiplier):
    """mult·h Wᵀ + b (the forward of ``lazyfast.models._Dense``), as one GEMM with fused scale and bias."""
    if bias is None:
        return torch.mm(h, weight.T).mul_(multiplier) if multiplier != 1.0 else torch.mm(h, weight.T)
    return torch.addmm(bias, h, weight.T, alpha=multiplier)


def mlp_ntk_layerwise(mlp, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace") -> torch.Tensor:
    """Structured eNTK of an MLP in plain PyTorch: the factors of :func:`mlp_factors`
    and one dense Gram pair per layer (the layerwise baseline of the benchmarks)."""
    f1 = mlp_factors(mlp, x1)
    if x2 is None:
        return hadamard_gram_sum(f1[0], f1[1], None, None, f1[2], f1[3], mode=mode)
    f2 = mlp_factors(mlp, x2)
    return hadamard_gram_sum(f1[0], f1[1], f2[0], f2[1], f1[2], f1[3], mode=mode)


# ============================================================================= authors' kernel extraction (baseline d)
def per_output_loop_kernel(model: nn.Module, x: torch.Tensor, *, batch_size: int = 9,
                           out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The authors' tangent-kernel extraction (lazy-training-CNN ``cnn/extract_kernel.py``):
    for each batch b, one ``backward`` per image and class fills J_b (bs·k, P); the kernel
    blocks J_b J_b'ᵀ are formed over batch pairs b' ≥ b (J_b' recomputed the same way)
    and mirrored. Returns (N·k, N·k) in ``out_dtype`` with row = k·n + class. Memory ≈ 2·bs·k·P."""
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)

    def jac(xb):
        out = model(xb)
        nb = out.shape[0]
        k = out.reshape(nb, -1).shape[1]
        out = out.reshape(nb, k)
        J = torch.empty(nb * k, P, dtype=params[0].dtype, device=x.device)
        for i in range(nb):
            for a in range(k):
                grads = torch.autograd.grad(out[i, a], params, retain_graph=True, allow_unused=True)
                J[i * k + a] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                          for g, p in zip(grads, params)])
        return J

    N = x.shape[0]
    starts = list(range(0, N, batch_size))
    K = None
    for bi, s in enumerate(starts):
        Jb = jac(x[s:s + batch_size])
        k = Jb.shape[0] // min(batch_size, N - s)
        if K is None:
            K = torch.zeros(N * k, N * k, dtype=out_dtype, device=x.device)
        for s2 in starts[bi:]:
            Jb2 = Jb if s2 == s else jac(x[s2:s2 + batch_size])
            blk = (Jb @ Jb2.T).to(out_dtype)
            K[s * k:s * k + Jb.shape[0], s2 * k:s2 * k + Jb2.shape[0]] = blk
            K[s2 * k:s2 * k + Jb2.shape[0], s * k:s * k + Jb.shape[0]] = blk.T
            del Jb2
    if K is None:
        return torch.zeros(0, 0, dtype=out_dtype, device=x.device)
    return K


# ============================================================================= linearized training step baseline
def linearized_step_torch_func(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float,
                               loss_fn: Optional[Callable] = None):
    """Baseline linearized SGD step written with ``torch.func.jvp`` and autograd through it:
    f̄(w, x) = f(w0, x) + J(w0, x)(w − w0), loss (1/2n)Σ‖f̄ − y‖² by default.

    Returns ``(step, params)``: ``step()`` performs one SGD step and returns the loss before
    it; ``params`` is the dict of trainable tensors being updated.
    """

    model0 = copy.deepcopy(model)
    w0 = {k: v.detach() for k, v in model0.named_parameters() if v.requires_grad}
    w = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    opt = torch.optim.SGD(list(w.values()), lr=lr)
    if loss_fn is None:
        def loss_fn(out, target):
            return 0.5 * (out - target).pow(2).sum() / max(out.shape[0], 1)

    def f(p):
        return functional_call(model0, p, (x,), strict=False).reshape(x.shape[0], -1)

    def step():
        opt.zero_grad(set_to_none=True)
        delta = {k: w[k] - w0[k] for k in w}
        f0, df = _func_jvp(f, (w0,), (delta,))
        loss = loss_fn(f0.detach() + df, y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step, w
