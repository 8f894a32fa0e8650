"""The generic eNTK path for any ``nn.Module``, memory-bounded (docs/engine.md, "generic").

* ``"jacobian"``: Jacobian contraction chunked over samples AND parameter blocks
  (:func:`ntk_jacobian_blocked`), never holding more than the budget; with one block and one
  chunk it is the torch.func tutorial's method with J built once when x2 is None.
* ``"ntk_vp"``: one VJP + one JVP per kernel column, columns vmapped in chunks sized to the
  budget (:func:`ntk_ntkvp`).
* ``"auto"``: the cheaper of the two by a FLOP model with the forward cost measured
  (:func:`generic_costs`).

Every function takes ``names``: the trainable parameters to differentiate (default all);
the others are held constant. The structured engine (:mod:`lazyfast.structured`) hands the
parameters its rules do not cover to :func:`generic_ntk` this way.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp as _func_jvp, vjp as _func_vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lazyfast._engine.outputs import ModelForwardError, _forward_detail, model_output, output_dim
from lazyfast._engine.state import StateGuard
from lazyfast._engine.uses import AliasGuard, parameter_storages
from lazyfast._validation import DEFAULT_MEMORY_BUDGET

Params = Dict[str, torch.Tensor]


def math_attention():
    """``scaled_dot_product_attention`` by its math (composite) backend, which has forward-mode AD;
    the fused CPU / flash kernels have none. Used by the passes that need forward mode (Linearized's
    tangent pass, NTK-vector products of a remainder); the primal elsewhere keeps the fused kernels."""
    return sdpa_kernel([SDPBackend.MATH])


def functional_model(model: nn.Module, names: Optional[Sequence[str]] = None):
    """(f, params, fixed): f(sub, x) → (n, k) with ``sub`` the differentiated parameters and
    ``fixed`` the other trainable parameters, detached."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True): its tangent kernel is empty")
    if names is not None:
        unknown = sorted(set(names) - set(params))
        if unknown:
            raise ValueError(f"names has entries that are not trainable parameters of the model: {unknown}")
        keep = set(names)
        fixed = {n: p for n, p in params.items() if n not in keep}
        params = {n: p for n, p in params.items() if n in keep}
    else:
        fixed = {}

    storages = parameter_storages(model)
    subs = list(fixed.values()) + list(params.values())

    def f(p: Params, x: torch.Tensor) -> torch.Tensor:
        with AliasGuard(storages, subs + list(p.values())):
            out = functional_call(model, {**fixed, **p}, (x,), strict=False)
        return model_output(out, x.shape[0]).reshape(x.shape[0], -1)

    return f, params


@contextlib.contextmanager
def _transform_errors(model: nn.Module, x: Optional[torch.Tensor] = None):
    """Turns torch.func failures on a model's forward into clear errors that say what in the model
    the per-sample transforms (vmap / jacrev / jvp) cannot follow, and what to do; an IndexError
    of the forward (token ids out of range) becomes a ModelForwardError about the inputs ``x``."""
    try:
        yield
    except IndexError as e:
        if x is None:
            raise
        raise ModelForwardError(_forward_detail(x, e)) from e
    except RuntimeError as e:
        msg = str(e)
        rnn = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.RNNBase)), None)
        if "setup_context" in msg:
            why = ("the forward calls an autograd.Function that torch.func transforms cannot run (e.g. "
                   "torch.utils.checkpoint(..., use_reentrant=True): use use_reentrant=False)")
        elif "data-dependent control flow" in msg or ".item()" in msg:
            why = ("the forward branches on the values of tensors (if x.sum() > 0: ..., .item()), which "
                   "torch.func.vmap cannot follow per sample; compute the branch with torch.where instead")
        elif rnn is not None:
            why = (f"{type(rnn[1]).__name__} {rnn[0]!r}: recurrent layers (nn.RNN / GRU / LSTM) cannot be batched by "
                   "torch.func.vmap, and lazyfast has no layer rule for them yet")
        else:
            raise
        raise ValueError(f"the generic eNTK path (torch.func, per sample) cannot differentiate this model: {why}. "
                         f"torch said: {msg.splitlines()[0][:200]}") from e


def _k(model, x1, x2, k):
    if k is not None:
        return k

    return output_dim(model, x1 if x1.shape[0] or x2 is None else x2)


# ----------------------------------------------------------------------------- cost probes
def forward_flops_per_sample(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward pass on one sample, counted by ``torch.utils.flop_counter``
    (matmuls and convolutions); at least 2·P so elementwise-only models are not free."""

    p = sum(t.numel() for t in model.parameters())
    if x.shape[0] == 0:
        return float(2 * p)
    with StateGuard(model), torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x[:1].detach())
    return float(max(fc.get_total_flops(), 2 * p))


def activation_numel_per_sample(model: nn.Module, x: torch.Tensor) -> int:
    """Numbers produced by the leaf modules in one forward pass of one sample: what a
    backward pass must keep (used to bound vmapped backward passes)."""

    total = [0]

    def hook(_m, _inp, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    if x.shape[0] == 0:
        return int(x[:1].numel()) or 1
    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with StateGuard(model), torch.no_grad():
            model(x[:1].detach())
    finally:
        for h in handles:
            h.remove()
    return max(total[0], int(x[:1].numel()))


# ----------------------------------------------------------------------------- blocked Jacobian contraction
def _param_blocks(params: Params, max_numel: int):
    """Greedy groups of consecutive parameter tensors with ≤ max_numel numbers (a tensor larger
    than that forms its own block; the sample chunk then shrinks for it)."""
    blocks, cur, size = [], [], 0
    for name, p in params.items():
        if cur and size + p.numel() > max_numel:
            blocks.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += p.numel()
    if cur:
        blocks.append(cur)
    return blocks


def _block_jacobian(f, params: Params, names, x: torch.Tensor):
    """Per-sample Jacobians of f w.r.t. the parameters ``names`` only: one (n, k, P_t) view per
    tensor (never concatenated: that copy would cost as much as a contraction)."""
    fixed = {n: p for n, p in params.items() if n not in names}
    blk = {n: params[n] for n in names}

    def single(b, xi):
        return f({**fixed, **b}, xi.unsqueeze(0))[0]

    jac = vmap(jacrev(single), (None, 0))(blk, x)
    n = x.shape[0]
    return [jac[nm].reshape(n, jac[nm].shape[1], -1) for nm in names]


def _contract_blocks(j1s, j2s, mode: str, k: int) -> torch.Tensor:
    """Σ_t J1_t J2_tᵀ: (n1, n2, k, k) full, (n1, n2) trace = (1/k)·Σ_a."""
    out = None
    for a, b in zip(j1s, j2s):
        if mode == "full":
            t = torch.einsum("iap,jbp->ijab", a, b)
        else:
            t = a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T
        out = t if out is None else out.add_(t)
    return out if mode == "full" else out.div_(k)


def ntk_jacobian_blocked(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *,
                         mode: str = "trace", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                         chunk_size: Optional[int] = None, names: Optional[Sequence[str]] = None,
                         k: Optional[int] = None, act_numel: Optional[int] = None) -> torch.Tensor:
    """Jacobian contraction that never holds more than about ``memory_budget`` bytes of
    Jacobians and backward intermediates.

    Parameters are grouped in blocks of P_b numbers and samples in chunks of c so that
    2·c·k·P_b + 2·c·k·A ≤ budget (A: activation numbers per sample). Large sample chunks
    are preferred (fewer recomputed Jacobians); with x2=None only chunk pairs J ≥ I are
    contracted and mirrored. ``chunk_size`` caps c.
    Shapes: x1 (n1, ...), x2 (n2, ...) → (n1, n2) trace | (n1, n2, k, k) full.
    """
    same = x2 is None
    k = _k(model, x1, x2, k)
    x2 = x1 if same else x2
    f, params = functional_model(model, names)
    n1, n2 = x1.shape[0], x2.shape[0]
    dtype = next(iter(params.values())).dtype
    shape = (n1, n2) if mode == "trace" else (n1, n2, k, k)
    out = torch.zeros(shape, dtype=dtype, device=x1.device)
    if n1 == 0 or n2 == 0:
        return out
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = max(int(memory_budget // itemsize), 1)  # numbers
    act = act_numel if act_numel is not None else activation_numel_per_sample(model, x1)
    n_max = max(n1, n2)
    c_cap = min(n_max, chunk_size or n_max)
    # Parameter block size if all c_cap samples of both batches fit; at least the largest tensor.
    per_sample_act = 2 * k * act
    p_block = max(1, (budget - c_cap * per_sample_act) // max(2 * c_cap * k, 1))
    for blk_names in _param_blocks(params, p_block):
        pb = sum(params[nm].numel() for nm in blk_names)
        c = max(1, min(c_cap, budget // max(2 * k * pb + per_sample_act, 1)))
        for s1 in range(0, n1, c):
            e1 = min(s1 + c, n1)
            j1 = _block_jacobian(f, params, blk_names, x1[s1:e1])
            for s2 in range(s1 if same else 0, n2, c):
                e2 = min(s2 + c, n2)
                j2 = j1 if (same and s2 == s1) else _block_jacobian(f, params, blk_names, x2[s2:e2])
                blk = _contract_blocks(j1, j2, mode, k)
                out[s1:e1, s2:e2] += blk
                if same and s2 != s1:
                    out[s2:e2, s1:e1] += blk.transpose(0, 1) if mode == "trace" else blk.permute(1, 0, 3, 2)
                del j2
            del j1
    return out.detach()


# ----------------------------------------------------------------------------- NTK-vector products
def ntk_ntkvp(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
              chunk_size: Optional[int] = None, names: Optional[Sequence[str]] = None,
              k: Optional[int] = None) -> torch.Tensor:
    """eNTK by NTK-vector products: one VJP over x2 and one JVP over x1 per column,
    ``chunk_size`` columns (unit cotangents) at a time, for the parameters ``names``."""
    k = _k(model, x1, x2, k)
    x2 = x1 if x2 is None else x2
    f, params = functional_model(model, names)
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
    size = chunk_size or n2 * k
    for s in range(0, n2 * k, size):
        e = min(s + size, n2 * k)
        cols.append(vmap(column)(eye[s:e].reshape(e - s, n2, k)))  # (c, n1, k)
    res = torch.cat(cols).reshape(n2, k, n1, k)  # res[j, b, i, a] = Θ(x1_i, x2_j)_{ab}
    full = res.permute(2, 0, 3, 1)
    if mode == "full":
        return full.contiguous().detach()
    return torch.diagonal(full, dim1=2, dim2=3).mean(-1).detach()


def ntkvp_column_chunk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, memory_budget: int,
                       names: Optional[Sequence[str]] = None, act_numel: Optional[int] = None) -> int:
    """Kernel columns per vmapped VJP+JVP batch within ``memory_budget`` bytes: each column
    holds one parameter-sized cotangent/tangent and tangent activations over x1 and x2."""
    _, dtype = next(((p.device, p.dtype) for p in model.parameters()), (None, torch.float32))
    itemsize = torch.empty((), dtype=dtype).element_size()
    p = _n_params(model, names)
    act = act_numel if act_numel is not None else activation_numel_per_sample(model, x1)
    per_col = 2 * p + 2 * (x1.shape[0] + x2.shape[0]) * act
    return max(1, int(memory_budget // (itemsize * per_col)))


def _n_params(model, names):
    keep = None if names is None else set(names)
    return sum(t.numel() for n, t in model.named_parameters() if t.requires_grad and (keep is None or n in keep))


# ----------------------------------------------------------------------------- cost model and dispatch
# Per-sample weight gradients under torch.func.vmap run as per-sample (grouped or looped) products, far
# slower than their FLOP count: measured on timm / Hugging Face models with a small remainder, the
# structured engine + remainder matched or beat the whole-model Jacobian path (1.0-3.0x at n = 8) while
# the plain FLOP model chose the latter (scripts/check_remainder_choice.py, benchmarks/results/remainder_choice_cpu.json).
# W = 9 counts forming every parameter's per-sample gradient as 4x its FLOPs.
VMAP_WEIGHT_GRAD_COST = 9.0


def generic_costs(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor], mode: str,
                  memory_budget: int, *, names: Optional[Sequence[str]] = None, k: Optional[int] = None,
                  forward_flops: Optional[float] = None, act_numel: Optional[int] = None,
                  vmap_weight_grads: bool = False) -> Dict[str, float]:
    """Estimated FLOPs of the two generic methods (docs/engine.md), with [FP] measured:
    Jacobian contraction ≈ (3 + W·s)·k·[FP]·(Jacobians computed) + 2·n1·n2·k^(1|2)·P, where blocked
    chunks recompute x2's Jacobians once per x1 chunk, s = P / (all trainable parameters) is the share
    of the parameters whose per-sample gradients are formed and W = :data:`VMAP_WEIGHT_GRAD_COST` what
    forming them under vmap costs beyond the FLOP count (with ``vmap_weight_grads``: the structured-vs-
    generic choice; W = 0 otherwise, for the choice between the two generic methods); NTK-vector products ≈ n2·k columns, each a
    VJP over x2 (≈ 2·n2·[FP]) and a JVP over x1 (≈ 3·n1·[FP])."""
    same = x2 is None
    x2 = x1 if same else x2
    n1, n2 = x1.shape[0], x2.shape[0]
    xs = x1 if n1 else x2
    fp = forward_flops if forward_flops is not None else forward_flops_per_sample(model, xs)
    p = _n_params(model, names)
    k = _k(model, x1, None if same else x2, k)
    dtype = next(model.parameters()).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    act = act_numel if act_numel is not None else activation_numel_per_sample(model, xs)
    c = max(1, min(max(n1, n2), int(memory_budget // itemsize) // max(2 * k * p + 2 * k * act, 1)))
    chunks1 = -(-n1 // c)
    jac_samples = n1 + n2 * (chunks1 if not same else max(chunks1 - 1, 1) / 2 + 1)
    contraction = 2.0 * n1 * n2 * p * (k * k if mode == "full" else k) * (0.5 if same else 1.0)
    share = p / max(_n_params(model, None), 1)
    w = VMAP_WEIGHT_GRAD_COST if vmap_weight_grads else 0.0
    jc = (3.0 + w * share) * k * fp * jac_samples + contraction
    vp = n2 * k * (2.0 * n2 + 3.0 * n1) * fp
    return {"jacobian": jc, "ntk_vp": vp, "forward_flops": fp}


def choose_generic_implementation(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor], mode: str,
                                  memory_budget: int, **probe) -> str:
    """``"jacobian"`` or ``"ntk_vp"``, whichever the FLOP model says is cheaper."""
    costs = generic_costs(model, x1, x2, mode, memory_budget, **probe)
    return "jacobian" if costs["jacobian"] <= costs["ntk_vp"] else "ntk_vp"


def generic_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
                implementation: str = "auto", chunk_size: Optional[int] = None,
                memory_budget: int = DEFAULT_MEMORY_BUDGET, names: Optional[Sequence[str]] = None,
                k: Optional[int] = None, forward_flops: Optional[float] = None,
                act_numel: Optional[int] = None) -> torch.Tensor:
    """eNTK of any module within ``memory_budget`` bytes of working memory.

    ``chunk_size``: samples per Jacobian chunk (``"jacobian"``) or kernel columns per
    vmapped batch (``"ntk_vp"``); None sizes it from the budget. ``names``: the trainable
    parameters to differentiate (default all; the others are constants). ``k``,
    ``forward_flops``, ``act_numel``: probe results when the caller has them.
    Shapes: x1 (n1, ...), x2 (n2, ...) or None → (n1, n2) trace | (n1, n2, k, k) full.
    """
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")

    with StateGuard(model), _transform_errors(model, x1):
        k = _k(model, x1, x2, k)
        empty = x1.shape[0] == 0 or (x2 is not None and x2.shape[0] == 0)
        if implementation == "auto":
            if empty:
                implementation = "jacobian"
            else:
                xs = x1
                if act_numel is None:
                    act_numel = activation_numel_per_sample(model, xs)
                implementation = choose_generic_implementation(model, x1, x2, mode, memory_budget, names=names, k=k,
                                                               forward_flops=forward_flops, act_numel=act_numel)
        if implementation == "ntk_vp":
            if chunk_size is None and not empty:
                chunk_size = ntkvp_column_chunk(model, x1, x1 if x2 is None else x2, memory_budget, names=names,
                                                act_numel=act_numel)
            return ntk_ntkvp(model, x1, x2, mode=mode, chunk_size=chunk_size, names=names, k=k)
        if implementation == "jacobian":
            return ntk_jacobian_blocked(model, x1, x2, mode=mode, memory_budget=memory_budget, chunk_size=chunk_size,
                                        names=names, k=k, act_numel=act_numel)
    raise ValueError(f"implementation must be 'auto', 'jacobian' or 'ntk_vp', got {implementation!r}")
