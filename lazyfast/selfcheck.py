"""The randomized self-check of an eNTK against the real model (docs/engine.md, "The self-check").

For a few samples S of the batch and random Gaussian directions v, a kernel K must satisfy

    vᵀ K[S, S'] v'  =  ⟨J(x_S)ᵀ v, J(x_S')ᵀ v'⟩,

where the right side is computed by ordinary autograd through the user's own module (one forward
and backward over the samples S, no lazyfast rule, no substitution of parameters: it sees every
parameter, alias, hook and branch the model has). In ``mode="full"`` (or k = 1) one direction per
side suffices; in ``mode="trace"`` with k > 1 the trace (1/k)·Σ_a Θ_aa needs the k directions
g ⊗ e_a (one batched backward), and the identity is Σ_a ⟨J_Sᵀ(g⊗e_a), J_S'ᵀ(g'⊗e_a)⟩ = k·gᵀK g'.

Tolerance, from the dtype's error model: |lhs − rhs| ≤ √ε · (√|S|·Σ_d ‖J_Sᵀv_d‖·‖J_S'ᵀv'_d‖ + |lhs|)
(√ε ≈ 3.5e-4 in float32, 1.5e-8 in float64): the bound's first term is what rounding in the
kernel's entries (each within a few ε of √(Θ_ii Θ_jj)) can add up to over the |S|² sampled pairs;
the engine's own float32 error is ~1e-6 of that.

What it catches: any missing, extra or wrong contribution to the sampled block of the kernel that
a random direction sees (with probability 1 for a nonzero error: the directions are Gaussian), e.g.
a parameter used outside its layer, an alias the substitution missed, a stale plan, a wrong
output layout. What it does not catch: errors confined to entries outside the sampled rows,
errors below the tolerance, and a model whose forward differs between the check's batch (|S|
samples) and the call's batch (a forward that depends on the batch as a whole is not a function
of each sample; the check then reports a difference).
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch
from torch import nn

from lazyfast._engine.outputs import model_output
from lazyfast._engine.state import StateGuard

__all__ = ["SelfCheckError", "self_check", "check_cost_fraction", "CHECK_SAMPLES", "AUTO_MAX_FRACTION"]

CHECK_SAMPLES = 4           # samples of each side the check differentiates
AUTO_MAX_FRACTION = 0.10    # check="auto" runs the check when its estimated cost is at most this of the call's
_SEED = 0x1A2F_5EED         # the check's own generator: results reproducible, the user's RNG untouched


class SelfCheckError(RuntimeError):
    """The kernel disagreed with autograd through the real model (the message says by how much)."""


# Cost of the check's per-parameter work (forming J_Sᵀv for each direction, the dot products),
# in FLOP-equivalents per parameter and direction: memory-bound at a few samples, so far dearer
# per FLOP than the call's large GEMMs (calibrated on the MLP row, whose check costs about a fifth
# of the call: benchmarks/results/selfcheck_cpu.md; the estimate is conservative on every row there).
PER_PARAM_COST = 400.0


def check_cost_fraction(n1: int, n2: Optional[int], k: int, mode: str, samples: int = CHECK_SAMPLES, *,
                        forward_flops: Optional[float] = None, n_params: Optional[int] = None) -> float:
    """The check's estimated cost as a fraction of the call's. The call captures every sample
    once with a k-wide backward: at least (1 + 2k)·F per sample (F: forward FLOPs per sample,
    2·P when unknown). The check runs (1 + 2d)·F on its |S| samples per side and forms d
    parameter-sized gradients per side (:data:`PER_PARAM_COST` each parameter), with d = k
    directions in trace mode with k > 1, else 1."""
    same = n2 is None
    n_cap = n1 + (0 if same else n2)
    if n_cap == 0:
        return float("inf")
    P = float(n_params or 0)
    F = float(forward_flops or 2.0 * P or 1.0)
    d = k if (mode == "trace" and k > 1) else 1
    sides = 1 if same else 2
    s = min(n1, samples) + (0 if same else min(n2, samples))
    check = s * (1 + 2 * d) * F + sides * d * P * PER_PARAM_COST
    return check / (n_cap * (1 + 2 * k) * F)


def _directions(s: int, k: int, mode: str, gen: torch.Generator, dtype, device) -> torch.Tensor:
    """(d, s, k) cotangents: one Gaussian (s, k) (full, or k = 1), or g ⊗ e_a for a < k (trace)."""
    if mode == "full" or k == 1:
        return torch.randn(1, s, k, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    g = torch.randn(s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    eye = torch.eye(k, dtype=dtype, device=device)
    return g[None, :, None] * eye[:, None, :]


def _grads(model: nn.Module, params, x: torch.Tensor, V: torch.Tensor, k: int, budget: int):
    """J(x)ᵀ V_d for each direction d, by autograd through ``model``: a list over d of lists over
    parameters, in chunks of directions (one batched backward each, a loop where batching fails)."""
    with torch.enable_grad():
        out = model_output(model(x), x.shape[0]).reshape(x.shape[0], k)
    P = sum(p.numel() for p in params)
    per = max(1, budget // max(P * V.element_size(), 1))
    res = []
    for d0 in range(0, V.shape[0], per):
        Vc = V[d0:d0 + per]
        last = d0 + per >= V.shape[0]
        if Vc.shape[0] > 1:
            try:
                gs = torch.autograd.grad(out, params, grad_outputs=Vc, is_grads_batched=True, allow_unused=True,
                                         retain_graph=not last)
                res.extend([[None if g is None else g[i] for g in gs] for i in range(Vc.shape[0])])
                continue
            except RuntimeError:
                pass
        for i in range(Vc.shape[0]):
            res.append(list(torch.autograd.grad(out, params, grad_outputs=Vc[i], allow_unused=True,
                                                retain_graph=True)))
    return res


def _dot(a, b) -> float:
    """Σ over parameters of ⟨a_p, b_p⟩: one BLAS dot per tensor in its dtype, summed in float64."""
    tot = 0.0
    for x, y in zip(a, b):
        if x is not None and y is not None:
            tot += float(torch.dot(x.reshape(-1), y.reshape(-1)))
    return tot


def self_check(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor], K: torch.Tensor, *, mode: str,
               k: int, samples: int = CHECK_SAMPLES, implementation: str = "", raise_on_failure: bool = True,
               memory_budget: int = 256 * 1024**2) -> dict:
    """Checks the kernel ``K`` of ``model`` on (x1, x2) against autograd through the model itself.

    Args:
        K: (n1, n2) trace or (n1, n2, k, k) full, as ``empirical_ntk`` returns it.
        samples: samples of each side that are differentiated (random, from a fixed seed).
        implementation: named in the failure message.

    Returns:
        dict with ``passed``, ``kernel`` (vᵀKv'), ``autograd`` (⟨Jᵀv, J'ᵀv'⟩), ``error``,
        ``tolerance``, ``samples`` (indices), ``directions``, ``seconds``. Raises
        :class:`SelfCheckError` on a failure when ``raise_on_failure``.
    """

    t0 = time.perf_counter()
    same = x2 is None
    n1 = x1.shape[0]
    n2 = n1 if same else x2.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = params[0].dtype
    if n1 == 0 or n2 == 0 or not params:
        return {"passed": True, "skipped": "empty batch", "seconds": 0.0}
    gen = torch.Generator().manual_seed(_SEED)
    i1 = torch.randperm(n1, generator=gen)[:min(n1, samples)].sort().values
    i2 = i1 if same else torch.randperm(n2, generator=gen)[:min(n2, samples)].sort().values
    V1 = _directions(i1.numel(), k, mode, gen, dtype, x1.device)
    V2 = V1 if same else _directions(i2.numel(), k, mode, gen, dtype, x1.device)
    dev = x1.device
    with StateGuard(model):
        G1 = _grads(model, params, x1[i1.to(dev)], V1, k, memory_budget)
        G2 = G1 if same else _grads(model, params, x2[i2.to(dev)], V2, k, memory_budget)
    if same:
        sq = [_dot(a, a) for a in G1]
        rhs, norms = sum(sq), sum(sq)
    else:
        rhs = sum(_dot(a, b) for a, b in zip(G1, G2))
        norms = sum(math.sqrt(max(_dot(a, a), 0.0) * max(_dot(b, b), 0.0)) for a, b in zip(G1, G2))
    Ks = K.detach()[i1.to(K.device)][:, i2.to(K.device)].double().cpu()
    v1, v2 = V1.double().cpu(), V2.double().cpu()
    if mode == "full":
        lhs = torch.einsum("ia,ijab,jb->", v1[0], Ks, v2[0])
    elif k == 1:
        lhs = v1[0, :, 0] @ Ks @ v2[0, :, 0]
    else:  # Σ_a (g⊗e_a)ᵀ Θ (g'⊗e_a) = k·gᵀ K_trace g'
        lhs = k * (v1[0, :, 0] @ Ks @ v2[0, :, 0])
    lhs = float(lhs)
    eps = torch.finfo(dtype).eps
    tol = math.sqrt(eps) * (math.sqrt(max(i1.numel(), i2.numel())) * norms + abs(lhs))
    err = abs(lhs - rhs)
    passed = bool(err <= tol) and math.isfinite(lhs) and math.isfinite(rhs)
    res = {"passed": passed, "kernel": lhs, "autograd": rhs, "error": err, "tolerance": tol,
           "relative_error": err / max(abs(rhs), 1e-300), "samples": i1.tolist() if same else [i1.tolist(), i2.tolist()],
           "directions": V1.shape[0], "seconds": time.perf_counter() - t0}
    if not passed and raise_on_failure:
        impl = f" (implementation={implementation!r})" if implementation else ""
        raise SelfCheckError(
            f"self-check failed{impl}: on samples {res['samples']} with random directions v, the kernel gives "
            f"vᵀKv' = {lhs:.6g} but autograd through the model gives ⟨J(x)ᵀv, J(x')ᵀv'⟩ = {rhs:.6g} (difference "
            f"{err:.3g} > tolerance {tol:.3g}, {dtype}): the kernel does not match the model's derivatives. The "
            "model likely does something no fast path can see (a parameter reached through an alias or a global, "
            "a forward that depends on the whole batch or on state that changes between calls). Fall back with "
            "implementation='jacobian' and check again; check=False skips this check")
    return res
