"""Tangent kernels of CNNs and other layered models, layer by layer, within a memory budget.

:func:`layerwise_ntk` captures, for every ``nn.Conv2d`` / ``nn.Linear`` with trainable
parameters, its input and the output gradients δ of each of the k outputs (one forward,
k backward passes over the batch: samples must be processed independently, as in any
network without batch statistics). Per layer the kernel is

    Θ_l[(i,a),(j,b)] = Σ_{p,p'} ⟨δ_a(x_i)_p, δ_b(x_j)_p'⟩ · (⟨u(x_i)_p, u(x_j)_p'⟩ + 1_bias)

over output positions p (u: the unfolded input patch). Each layer picks the cheaper of
two exact contractions by a FLOP count (ANCHORS.md §3.1, conv layers):
  * Jacobian contraction: per-example gradients δ_a(x_i)·U(x_i)ᵀ in output-channel
    blocks, then J1 J2ᵀ — cost ≈ (n k)²·P_l, best for early, high-resolution layers;
  * structured: the position-pair Grams of δ and of the patches, combined — cost
    ≈ (n k D)²·C_out + (n D)²·C_in·kh·kw, best where D² ≲ C_in·kh·kw (late, wide layers).
:func:`extract_kernel` is the authors' (10N)×(10N) kernel (row = 10·n + class) on top of it.
"""
from __future__ import annotations

import copy
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lazyfast import reference

DEFAULT_MEMORY_BUDGET = 2 * 1024**3


# ----------------------------------------------------------------------------- centering
class Centered(nn.Module):
    """h(w)(x) = model(x) − model₀(x) with model₀ a frozen copy of the initial model, so
    h(w₀) = 0 (the authors' CNN code: FC1(net(x)) − FC2(net2(x))). Only ``model`` trains."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.frozen = copy.deepcopy(model)
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.model(x) - self.frozen(x)


def centered(model: nn.Module) -> Centered:
    """Wraps ``model`` so its output at the current parameters is exactly zero."""
    return Centered(model)


# ----------------------------------------------------------------------------- capture
def _supported_layers(model: nn.Module):
    """(modules to capture) or raises ValueError naming what the layerwise path cannot do."""
    layers, covered = [], set()
    for name, m in model.named_modules():
        trainable = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not trainable:
            continue
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
            layers.append(m)
        elif isinstance(m, nn.Linear):
            layers.append(m)
        else:
            raise ValueError(f"layerwise kernel: module {name!r} ({type(m).__name__}) has trainable parameters but "
                             "only nn.Linear and nn.Conv2d (groups=1, zero padding) are supported; use "
                             "implementation='jacobian'")
        covered.update(id(p) for p in trainable)
    return layers


def _capture(model: nn.Module, layers, x: torch.Tensor):
    """One forward and k backward passes: per layer (input, δ (k, n, C_out, D)) and k."""
    inputs, outputs, calls = {}, {}, {}

    def hook(m, inp, out):
        calls[m] = calls.get(m, 0) + 1
        inputs[m] = inp[0].detach()
        outputs[m] = out

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    reused = [type(m).__name__ for m, c in calls.items() if c > 1]
    if reused:
        raise ValueError(f"layerwise kernel: layers applied more than once per forward ({reused}); "
                         "use implementation='jacobian'")
    missing = [m for m in layers if m not in outputs]
    layers = [m for m in layers if m in outputs]  # a trainable layer that never runs contributes 0
    n = x.shape[0]
    out = out.reshape(n, -1)
    k = out.shape[1]
    outs = [outputs[m] for m in layers]
    deltas = [[] for _ in layers]
    for a in range(k):
        grads = torch.autograd.grad(out[:, a].sum(), outs, retain_graph=a < k - 1, allow_unused=True)
        for l, (m, g) in enumerate(zip(layers, grads)):
            if g is None:
                g = torch.zeros_like(outs[l])
            deltas[l].append(_as_channels_positions(m, g.detach()))
    del outs, outputs, out
    caps = [(m, inputs[m], torch.stack(deltas[l])) for l, m in enumerate(layers)]
    return caps, k, missing


def _as_channels_positions(m, t):
    """Layer output (or its gradient) → (n, C_out, D)."""
    n = t.shape[0]
    if isinstance(m, nn.Conv2d):
        return t.reshape(n, t.shape[1], -1)
    return t.reshape(n, -1, t.shape[-1]).transpose(1, 2)  # Linear on (n, ..., C): positions = the middle dims


def _unfold(m, x_in):
    """Layer input → patches (n, C_in·kh·kw, D) in the weight's flattening order."""
    if isinstance(m, nn.Conv2d):
        return F.unfold(x_in, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    n = x_in.shape[0]
    return x_in.reshape(n, -1, x_in.shape[-1]).transpose(1, 2)


# ----------------------------------------------------------------------------- per-layer contraction
def _layer_costs(n1, n2, k, cout, ck, d):
    jc = (n1 * n2 * k * k) * cout * ck + (n1 + n2) * k * cout * d * ck
    st = (n1 * k * d) * (n2 * k * d) * cout + (n1 * d) * (n2 * d) * ck + n1 * n2 * k * k * d * d
    return jc, st


def _layer_kernel(m, cap1, cap2, k, budget, acc: torch.Tensor, method: str) -> str:
    """Adds layer m's kernel, viewed (n1·k, n2·k), into ``acc``. Returns the method used."""
    _, in1, d1 = cap1
    _, in2, d2 = cap2
    same = cap1 is cap2
    w_on = m.weight.requires_grad
    b_on = m.bias is not None and m.bias.requires_grad
    n1, n2 = d1.shape[1], d2.shape[1]
    cout, d = d1.shape[2], d1.shape[3]
    if not w_on:  # bias only: ⟨Σ_p δ_p, Σ_p' δ'_p'⟩
        s1 = d1.sum(-1).transpose(0, 1).reshape(n1 * k, cout)
        s2 = s1 if same else d2.sum(-1).transpose(0, 1).reshape(n2 * k, cout)
        acc += (s1 @ s2.T).to(acc.dtype)
        return "bias"
    u1 = _unfold(m, in1)
    u2 = u1 if same else _unfold(m, in2)
    ck = u1.shape[1]
    jc, st = _layer_costs(n1, n2, k, cout, ck, d)
    if method == "auto":
        method = "jacobian" if jc <= st else "structured"
    if method == "jacobian":
        # J[(i,a), (o,q)] = Σ_p δ[a,i,o,p] U[i,q,p], in output-channel blocks within the budget.
        ob = max(1, min(cout, budget // max((n1 + n2) * k * ck, 1)))
        u1t, u2t = u1.transpose(1, 2), u2.transpose(1, 2)  # (n, D, ck)
        for o0 in range(0, cout, ob):
            o1 = min(o0 + ob, cout)

            def jac(dl, ut, n):
                dd = dl[:, :, o0:o1].permute(1, 0, 2, 3).reshape(n, k * (o1 - o0), d)
                return torch.bmm(dd, ut).reshape(n * k, (o1 - o0) * ck)

            j1 = jac(d1, u1t, n1)
            j2 = j1 if same else jac(d2, u2t, n2)
            acc += (j1 @ j2.T).to(acc.dtype)
            del j1, j2
        if b_on:
            s1 = d1.sum(-1).transpose(0, 1).reshape(n1 * k, cout)
            s2 = s1 if same else d2.sum(-1).transpose(0, 1).reshape(n2 * k, cout)
            acc += (s1 @ s2.T).to(acc.dtype)
        return "jacobian"
    # structured: G[(i,a,p),(j,b,p')] = ⟨δ, δ'⟩ over channels, M[(i,p),(j,p')] = ⟨u, u'⟩ + 1_bias
    e2 = d2.permute(1, 0, 3, 2).reshape(n2 * k * d, cout)
    v2 = u2.transpose(1, 2).reshape(n2 * d, ck)
    ci = max(1, min(n1, budget // max(k * d * n2 * k * d + d * n2 * d, 1)))
    for i0 in range(0, n1, ci):
        i1 = min(i0 + ci, n1)
        c = i1 - i0
        e1 = d1[:, i0:i1].permute(1, 0, 3, 2).reshape(c * k * d, cout)
        g = (e1 @ e2.T).reshape(c, k, d, n2, k, d)
        mm = (u1[i0:i1].transpose(1, 2).reshape(c * d, ck) @ v2.T).reshape(c, d, n2, d)
        if b_on:
            mm = mm + 1.0
        blk = torch.einsum("iapjbq,ipjq->iajb", g, mm).reshape(c * k, n2 * k)
        acc[i0 * k:i1 * k] += blk.to(acc.dtype)
        del g, mm, blk
    return "structured"


def layerwise_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "full",
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, out_dtype: Optional[torch.dtype] = None,
                  method: str = "auto", flat: bool = False, info: Optional[dict] = None) -> torch.Tensor:
    """eNTK of a model whose trainable parameters all live in ``nn.Conv2d``/``nn.Linear``
    layers, each applied once per forward, with samples processed independently.

    Args:
        x1: (n1, ...); x2: (n2, ...) or None for x1.
        mode: ``"full"`` → (n1, n2, k, k) (or (n1·k, n2·k) with ``flat=True``, row = k·i + a);
            ``"trace"`` → (n1, n2).
        memory_budget: bytes for per-layer working blocks (Jacobian blocks, position Grams).
        out_dtype: dtype of the result (accumulated in it); default the model's.
        method: ``"auto"`` (per-layer FLOP choice), ``"jacobian"`` or ``"structured"`` for all layers.
        info: optional dict filled with the method chosen per layer.
    """
    if method not in ("auto", "jacobian", "structured"):
        raise ValueError(f"method must be 'auto', 'jacobian' or 'structured', got {method!r}")
    layers = _supported_layers(model)
    if not layers:
        raise ValueError("model has no trainable parameters: its tangent kernel is empty")
    same = x2 is None
    dtype = next(p for p in model.parameters() if p.requires_grad).dtype
    out_dtype = out_dtype or dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = max(1, int(memory_budget // itemsize))
    with torch.no_grad():  # samples must not interact (batch statistics would make this path wrong)
        xs = x1[:2]
        if xs.shape[0] == 2:  # sample 0's output must not change when sample 1 does
            a = model(xs)[:1]
            b = model(torch.stack([xs[0], 1.0 - 2.0 * xs[1]]))[:1]
            tol = 1e-4 if dtype == torch.float32 else 1e-10
            if not torch.allclose(a, b, rtol=tol, atol=tol * float(a.abs().max().clamp_min(1))):
                raise ValueError("layerwise kernel: the model's output for a sample depends on the other samples "
                                 "of the batch (batch statistics?); use implementation='jacobian'")
    cap1, k, _ = _capture(model, layers, x1)
    cap2 = cap1 if same else _capture(model, layers, x2)[0]
    n1, n2 = x1.shape[0], (x1 if same else x2).shape[0]
    acc = torch.zeros(n1 * k, n2 * k, dtype=out_dtype, device=x1.device)
    used = []
    for c1, c2 in zip(cap1, cap2):
        used.append(_layer_kernel(c1[0], c1, c1 if same else c2, k, budget, acc, method))
    if info is not None:
        info["methods"] = used
        info["k"] = k
    if same:  # exact symmetry (the two halves of a GEMM need not round alike)
        acc = 0.5 * (acc + acc.T)
    if flat and mode == "full":
        return acc
    full = acc.reshape(n1, k, n2, k).permute(0, 2, 1, 3)
    if mode == "full":
        return full.contiguous()
    return torch.diagonal(full, dim1=2, dim2=3).mean(-1)


def extract_kernel(model: nn.Module, x: torch.Tensor, *, implementation: str = "auto",
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, dtype: torch.dtype = torch.float64,
                   info: Optional[dict] = None) -> torch.Tensor:
    """The full empirical tangent kernel of ``model`` at its current parameters, as the
    authors extract it for the centered VGG-11: (N·k, N·k) with row = k·n + class, in
    ``dtype`` (float64 by default, as their stored kernel), gradients in the model's dtype.

    ``implementation``: ``"auto"`` (layerwise per-layer choice when the model is made of
    Conv2d/Linear layers, else memory-bounded Jacobian contraction), ``"layerwise"``,
    ``"jacobian"``. Working memory beyond the captured activations stays within
    ``memory_budget`` bytes. Example: ``extract_kernel(centered(vgg11()), images)``.
    """
    if implementation not in ("auto", "layerwise", "jacobian"):
        raise ValueError(f"implementation must be 'auto', 'layerwise' or 'jacobian', got {implementation!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch tensor (N, ...), got {getattr(x, 'shape', type(x).__name__)}")
    if implementation in ("auto", "layerwise"):
        try:
            return layerwise_ntk(model, x, mode="full", flat=True, memory_budget=memory_budget, out_dtype=dtype,
                                 info=info)
        except ValueError:
            if implementation == "layerwise":
                raise
    full = reference.ntk_jacobian_blocked(model, x, mode="full", memory_budget=memory_budget)
    n, k = full.shape[0], full.shape[2]
    return full.permute(0, 2, 1, 3).reshape(n * k, n * k).to(dtype)
