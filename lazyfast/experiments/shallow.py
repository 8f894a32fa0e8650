"""The authors' two-layer ReLU experiments as batched, hand-differentiated torch loops.

Model (no biases, as in the authors' Julia code): ``f(x) = s · Σ_j a_j relu(b_j·x)`` with input
weights ``W = (b_j)`` (m, d) and output weights ``a`` (m,). Every loop here trains a *batch* of
B independent networks at once — e.g. all init scales τ of one trial — so a step is a handful of
large GEMMs instead of B small ones: W is (B, m, d), a is (B, m), and the data are shared
``(n, d)`` or per network ``(B, n, d)``.

Gradients are written by hand (the authors' formulas); they are tested against autograd.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

from lazyfast.data import sphere
from lazyfast.experiments.common import progress


def _per_net(v, B, like):
    """A scalar or a length-B sequence/tensor → a (B,) tensor like ``like``."""
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"expected a scalar or {B} values, got shape {tuple(t.shape)}")
    return t.clone()


def relu_net_forward(W: torch.Tensor, a: torch.Tensor, x: torch.Tensor, scaling) -> torch.Tensor:
    """``s · Σ_j a_j relu(b_j·x)`` for B nets: W (B, m, d), a (B, m), x (n, d) or (B, n, d) → (B, n)."""
    B = W.shape[0]
    s = _per_net(scaling, B, W)
    Z = torch.matmul(W, x.transpose(-1, -2))  # (B, m, n)
    return s[:, None] * torch.matmul(a.unsqueeze(1), Z.clamp_min(0)).squeeze(1)


def relu_net_gd(x_train: torch.Tensor, y_train: torch.Tensor, x_test: Optional[torch.Tensor],
                y_test: Optional[torch.Tensor], W: torch.Tensor, a: torch.Tensor, *, scaling, stepsize,
                niter: int, snapshot_at: Sequence[int] = (), desc: Optional[str] = None,
                show_progress: bool = True) -> Dict[str, object]:
    """Full-batch GD on ``F(W) = R(s·f)/s²`` with ``R = ½·mean (out − y)²`` — the authors' ``GDfor2NN``.

    One step: ``W ← W − (η/s²)·∇_W R(out)``, i.e. GD with step η on the scaled objective
    F_α of the paper with α = s. Losses are recorded at every iteration *before* the update.

    Args:
        x_train: (n, d) shared by all nets, or (B, n, d); y_train: (n,) or (B, n).
        x_test, y_test: likewise (or None to skip the test loss).
        W: (B, m, d) initial input weights; a: (B, m) initial output weights (not modified).
        scaling: s, a scalar or (B,); stepsize: η, a scalar or (B,).
        niter: number of GD steps.
        snapshot_at: iterations (0-based, before that iteration's update) at which to keep (W, a).

    Returns:
        dict with ``loss_train`` and ``loss_test`` (niter, B) float64 on the CPU, final ``W``, ``a``
        and ``snapshots`` {iteration: (W, a)}.
    """
    if W.dim() != 3 or a.dim() != 2 or a.shape != W.shape[:2]:
        raise ValueError(f"W must be (B, m, d) and a (B, m), got {tuple(W.shape)} and {tuple(a.shape)}")
    B, m, d = W.shape
    if x_train.shape[-1] != d:
        raise ValueError(f"x_train has {x_train.shape[-1]} features but W has d={d}")
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    s = _per_net(scaling, B, W)
    coef = _per_net(stepsize, B, W) / s  # the authors' W -= (stepsize/scaling)·grad, grad = ∇R/scaling
    W = W.clone()
    a = a.clone()
    shared = x_train.dim() == 2
    n = x_train.shape[-2]
    xt = x_train.transpose(-1, -2)
    xe = x_test.transpose(-1, -2) if x_test is not None else None
    y_train = y_train.reshape(-1, n) if shared else y_train
    loss_tr = torch.empty(niter, B, dtype=W.dtype, device=W.device)
    loss_te = torch.empty(niter, B, dtype=W.dtype, device=W.device)
    snaps = {}
    want = set(int(i) for i in snapshot_at)
    bar = progress(total=niter, desc=desc or "GD steps", leave=False, enabled=show_progress, mininterval=1.0)
    for it in range(niter):
        if it in want:
            snaps[it] = (W.clone(), a.clone())
        if shared:  # one GEMM for all B·m neurons
            Z = (W.reshape(B * m, d) @ xt).reshape(B, m, n)
        else:
            Z = torch.bmm(W, xt)
        H = Z.clamp_min(0)
        res = s[:, None] * torch.bmm(a.unsqueeze(1), H).squeeze(1) - y_train  # (B, n)
        loss_tr[it] = 0.5 * (res * res).mean(-1)
        if xe is not None:
            res_te = relu_net_forward(W, a, x_test, s) - y_test
            loss_te[it] = 0.5 * (res_te * res_te).mean(-1)
        r = res / n
        grad_a = (H * r.unsqueeze(1)).sum(-1)  # (B, m); cheaper than a batched GEMV
        # relu'(z) = sign(relu(z)); fused in place: G = relu'(Z) ⊙ a ⊗ r, (B, m, n)
        G = torch.sign(H).mul_(a.unsqueeze(-1)).mul_(r.unsqueeze(1))
        if shared:
            grad_W = (G.reshape(B * m, n) @ x_train).reshape(B, m, d)
        else:
            grad_W = torch.bmm(G, x_train)
        W -= coef[:, None, None] * grad_W
        a -= coef[:, None] * grad_a
        if (it & 255) == 255:
            bar.update(256)
    bar.update(niter % 256)
    bar.close()
    if niter in want:
        snaps[niter] = (W.clone(), a.clone())
    if xe is None:
        loss_te.fill_(float("nan"))
    return {"loss_train": loss_tr.cpu().double(), "loss_test": loss_te.cpu().double(), "W": W, "a": a,
            "snapshots": snaps}


def relu_net_population_sgd(teacher_W: torch.Tensor, teacher_a: torch.Tensor, W: torch.Tensor, a: torch.Tensor, *,
                            stepsize, batchsize: int, niter: int, generator: torch.Generator,
                            teacher_scale: Optional[float] = None, theta_step_factor: Optional[float] = None,
                            desc: Optional[str] = None, show_progress: bool = True) -> Dict[str, object]:
    """Online SGD on fresh sphere-uniform batches — the authors' ``populationSGDfor2NN``.

    Student ``Y = (1/m) Σ_j a_j relu(b_j·x)``; teacher ``Y0 = teacher_scale · Σ_k a*_k relu(b*_k·x)``
    (the authors divide by the batch size: ``teacher_scale=None`` means 1/batchsize). The loss
    ``½·mean (Y − Y0)²`` on the fresh batch is recorded before the update, so it is an unbiased
    estimate of the population loss. As in the authors' code the gradients omit the 1/m of the
    forward pass and the input weights take a step ``d``× larger (``theta_step_factor=None`` → d).
    All B nets see the same batches.

    Args:
        teacher_W: (m0, d) unit rows; teacher_a: (m0,).
        W: (B, m, d), a: (B, m) initial student weights. stepsize: scalar or (B,).
        generator: CPU generator for the batches (drawn in float64, then cast).

    Returns:
        dict with ``loss`` (niter, B) float64 on the CPU and final ``W``, ``a``.
    """
    B, m, d = W.shape
    if teacher_W.shape[-1] != d:
        raise ValueError(f"teacher has d={teacher_W.shape[-1]} but the student has d={d}")
    tscale = 1.0 / batchsize if teacher_scale is None else float(teacher_scale)
    tfac = float(d) if theta_step_factor is None else float(theta_step_factor)
    eta = _per_net(stepsize, B, W)
    W = W.clone()
    a = a.clone()
    loss = torch.empty(niter, B, dtype=W.dtype, device=W.device)
    bar = progress(total=niter, desc=desc or "SGD steps", leave=False, enabled=show_progress, mininterval=1.0)
    for it in range(niter):
        x = sphere(batchsize, d, generator=generator, dtype=torch.float64).to(W.device, W.dtype)  # (bs, d)
        y0 = tscale * (torch.relu(x @ teacher_W.T) @ teacher_a)  # (bs,)
        Z = (W.reshape(B * m, d) @ x.T).reshape(B, m, batchsize)
        H = Z.clamp_min(0)
        res = torch.bmm(a.unsqueeze(1), H).squeeze(1) / m - y0  # (B, bs)
        loss[it] = 0.5 * (res * res).mean(-1)
        r = res / batchsize
        grad_a = (H * r.unsqueeze(1)).sum(-1)
        G = torch.sign(H).mul_(a.unsqueeze(-1)).mul_(r.unsqueeze(1))
        grad_W = (G.reshape(B * m, batchsize) @ x).reshape(B, m, d)
        W -= (tfac * eta)[:, None, None] * grad_W
        a -= eta[:, None] * grad_a
        if (it & 255) == 255:
            bar.update(256)
    bar.close()
    return {"loss": loss.cpu().double(), "W": W, "a": a}


# ----------------------------------------------------------------------------- inits and metrics
def gaussian_init(B: int, m: int, d: int, generator: torch.Generator, *, symmetric: bool,
                  positive_first_half: bool, dtype=torch.float64):
    """N(0,1) weights for B nets (drawn in float64 so results do not depend on ``dtype``).

    ``symmetric``: the second half of the neurons copies the first half's input weights with
    negated output weights (output exactly 0 at init); ``positive_first_half``: first-half output
    weights are |a| (the authors' test_vs_scale / populationSGD)."""
    W = torch.randn(B, m, d, generator=generator, dtype=torch.float64)
    a = torch.randn(B, m, generator=generator, dtype=torch.float64)
    if symmetric:
        if m % 2:
            raise ValueError(f"the symmetrized init needs an even width m, got m={m}")
        h = m // 2
        if positive_first_half:
            a[:, :h] = a[:, :h].abs()
        a[:, h:] = -a[:, :h]
        W[:, h:] = W[:, :h]
    return W.to(dtype), a.to(dtype)


def relative_change(W, a, W0, a0) -> torch.Tensor:
    """‖(W, a) − (W0, a0)‖ / ‖(W0, a0)‖ per net: (B,)."""
    num = ((W - W0) ** 2).sum((1, 2)) + ((a - a0) ** 2).sum(1)
    den = (W0 ** 2).sum((1, 2)) + (a0 ** 2).sum(1)
    return (num / den).sqrt()


def teacher_alignment(W: torch.Tensor, a: torch.Tensor, teacher_W: torch.Tensor) -> torch.Tensor:
    """For each net, the mean over the m0 *dominant* student neurons (largest |a_j|·‖b_j‖) of their
    best |cosine| with a teacher direction: (B,). Near 1 when the student found the teacher."""
    m0 = teacher_W.shape[0]
    mass = a.abs() * W.norm(dim=-1)  # (B, m)
    top = mass.topk(min(m0, W.shape[1]), dim=1).indices  # (B, m0)
    Wn = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = (Wn @ teacher_W.T.to(W.dtype)).abs().amax(-1)  # (B, m)
    return cos.gather(1, top).mean(1)


def generator_for(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and run indices (stable across processes)."""
    h = int(seed)
    for p in parts:
        h = (h * 1000003 + int(p) + 1) % (2 ** 62)
    return torch.Generator().manual_seed(h)


def log_grid(start_exp: float, stop_exp: float, step: float):
    """``10 ** arange(start_exp, stop_exp + step/2, step)`` like Julia's ``10 .^ (a:s:b)``."""
    n = int(math.floor((stop_exp - start_exp) / step + 1e-9)) + 1
    return [10.0 ** (start_exp + i * step) for i in range(n)]
