"""The capture: each rule layer's inputs and output cotangents, and the real call's check against the plan.

One forward (the rule layers bracketed) and one batched backward for all k outputs; the forward on
the real batch is compared with the plan before any cotangent is computed (docs/engine.md,
"Capture" and "Exact on every call").
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from lazyfast._engine.outputs import model_output, run_forward
from lazyfast._engine.structured.brackets import _Brackets
from lazyfast._engine.structured.plan import Plan, PlanMismatch, expand_shared, no_grad_message
from lazyfast._engine.structured.rules.attention import _Shadows
from lazyfast._engine.structured.rules.builtin import _wb
from lazyfast._engine.structured.rules.ops import match_op
from lazyfast._engine.uses import ParamUses, alias_message

# The per-call verification of the plan (on in production; off only to measure what it prevents).
_VERIFY = True


def _capture(model: nn.Module, plan: Plan, x: torch.Tensor, batched: bool = True, verify: Optional[bool] = None):
    """One forward and one batched backward: per layer, per call, (u, δ) with u the input
    (batch first, detached) and δ (k, n, *out) the output cotangents of all k outputs.

    The forward on the real batch confirms the plan (``verify``; docs/engine.md, "Exact on every
    call"): each rule layer ran as many times as planned, each call's input and output hold the
    batch at the planned axis with the planned per-sample shapes, no captured tensor was changed
    in place afterwards unless it was cloned, no covered parameter was used outside its layer's
    own forward, no parameter was reached through an alias, and the output is (n, k). A
    disagreement raises :class:`PlanMismatch` (the engine revises the plan and reruns) before
    any cotangent is computed; an alias raises ValueError."""
    layers = plan.layers
    n = x.shape[0]
    recs: Dict[int, list] = {id(L.module): [] for L in layers}
    by_id = {id(L.module): L for L in layers}

    def record(m, inp, out):
        L = by_id[id(m)]
        c = len(recs[id(m)])
        if not (isinstance(inp, torch.Tensor) and isinstance(out, torch.Tensor)):
            recs[id(m)].append(None)
            return None
        if c < len(L.shared) and L.shared[c] and inp.dim() >= 1 and inp.shape[0] == 1 and out.dim() >= 1 \
                and out.shape[0] == 1:
            # a shared call (docs/engine.md, "Shared calls"): each sample gets its own copy of the
            # rows, so its cotangent is that sample's; the consumers are watched
            z = expand_shared(uses, out, n, id(m))
            recs[id(m)].append([inp.detach().expand((n,) + tuple(inp.shape[1:])), z, inp, inp._version, z._version])
            return z
        u = inp.detach()
        if c < len(L.clone_in) and L.clone_in[c]:
            u = u.clone()
        recs[id(m)].append([u, out, inp, inp._version, out._version])
        if c < len(L.clone_out) and L.clone_out[c]:
            return out.clone()
        return None

    stack: list = []
    uses = None
    verify = _VERIFY if verify is None else verify
    sites = {L.site: L.module for L in layers if L.site is not None}
    if verify or sites or any(any(L.shared) for L in layers):
        owner = {}
        for L in layers:
            for p, on in zip(_wb(L.module), (L.w_on, L.b_on)):
                if on:
                    owner[id(p)] = L.module
        planned = {i: key for key in sites for i in key[1:] if i is not None}
        uses = ParamUses(model, owner if verify else {}, stack, sites=planned,
                         record_site=lambda key, inp, out, meta: record(sites[key], _planned_view(sites[key], meta, inp), out),
                         match=match_op)
    modules = [L.module for L in layers if L.site is None]
    with torch.enable_grad(), _Shadows(plan.shadows), _Brackets(modules, stack, record):
        if uses is not None:
            with uses:
                raw = run_forward(model, x)
        else:
            raw = run_forward(model, x)
    out = model_output(raw, n)
    if uses is not None and uses.shared_bad:
        raise PlanMismatch("a shared call's output (an Embedding on indices without the batch, or a parameter "
                           "expanded over the batch) was used other than by a batch-wise op",
                           drop={id(sites[key]) if isinstance(key, tuple) else key for key in uses.shared_bad},
                           reprobe=False)
    if verify:
        _verify_capture(model, plan, n, recs, uses, out)
    elif uses is not None and uses.aliased:
        raise ValueError(alias_message(sorted(uses.aliased)[0]))
    out = out.reshape(n, plan.k)
    n, k = x.shape[0], plan.k
    targets, index = [], []
    for L in layers:
        rs = recs[id(L.module)]
        if len(rs) != L.calls or None in rs:  # only without verification
            raise PlanMismatch(f"{type(L.module).__name__} ran {len(rs)} times, planned {L.calls}", drop={id(L.module)})
        for r in rs:
            index.append((L, r))
            targets.append(r[1])
    grads = [None] * len(targets)
    for (L, r) in index:
        if not r[1].requires_grad:
            raise ValueError(no_grad_message(model, L.module))
    if targets:
        eye = torch.eye(k, dtype=out.dtype, device=out.device).unsqueeze(1).expand(k, n, k)
        if batched and k > 1:
            try:
                grads = list(torch.autograd.grad(out, targets, grad_outputs=eye, is_grads_batched=True,
                                                 allow_unused=True, retain_graph=True))
            except RuntimeError:
                batched = False
        if not batched or k == 1:
            cols = [torch.autograd.grad(out, targets, grad_outputs=eye[a], allow_unused=True,
                                        retain_graph=a < k - 1) for a in range(k)]
            grads = [None if any(c[t] is None for c in cols) else
                     (cols[0][t].unsqueeze(0) if k == 1 else torch.stack([c[t] for c in cols]))
                     for t in range(len(targets))]
    del out
    caps: Dict[int, list] = {id(L.module): [] for L in layers}
    for (L, r), g in zip(index, grads):
        o = r[1]
        g = torch.zeros((k,) + tuple(o.shape), dtype=o.dtype, device=o.device) if g is None else g.detach()
        c = len(caps[id(L.module)])
        bd = L.bdims[c]
        fold = L.folds[c] if c < len(L.folds) else 1
        if fold > 1:  # (n·F, ...) rows → (n, F, ...)
            u = r[0].reshape((n, fold) + tuple(r[0].shape[1:]))
            g = g.reshape((k, n, fold) + tuple(g.shape[2:]))
            caps[id(L.module)].append((u, g))
            r.clear()
            continue
        u = r[0] if bd == 0 else r[0].movedim(bd, 0)
        caps[id(L.module)].append((u, g if bd == 0 else g.movedim(bd + 1, 1)))
        r.clear()
    return caps


def _planned_view(shell, meta, inp):
    """``inp``, or None (the call then disagrees with the plan) where the site took its parameter
    through a view of another shape than planned."""
    return inp if meta.get("view_shape") == getattr(shell, "view_shape", None) else None


def _verify_capture(model, plan: Plan, n: int, recs, uses, out) -> None:
    """Raises PlanMismatch (or ValueError for an alias) where the real call disagrees with the plan."""
    if uses.aliased:
        raise ValueError(alias_message(sorted(uses.aliased)[0]))
    if out.numel() != n * plan.k:
        raise PlanMismatch(f"the output has {out.numel() // max(n, 1)} numbers per sample, planned {plan.k}",
                           reprobe=True)
    drop, clone_in, clone_out = set(), set(), set()
    for L in plan.layers:
        rs = recs[id(L.module)]
        if len(rs) != L.calls or None in rs:
            drop.add(id(L.module))
            continue
        for c, r in enumerate(rs):
            u, o, inp, iv, ov = r
            bd = L.bdims[c]
            fold = L.folds[c] if c < len(L.folds) else 1
            if c < len(L.shared) and L.shared[c]:
                bad = (tuple(inp.shape) != (1,) + tuple(L.in_shapes[c])
                       or tuple(o.shape) != (n,) + tuple(L.out_shapes[c]))
            elif fold > 1:
                bad = (tuple(inp.shape) != (n * fold,) + tuple(L.in_shapes[c][1:])
                       or tuple(o.shape) != (n * fold,) + tuple(L.out_shapes[c][1:]))
            else:
                bad = (inp.dim() != len(L.in_shapes[c]) + 1 or o.dim() != len(L.out_shapes[c]) + 1
                       or inp.shape[bd] != n or o.shape[bd] != n
                       or tuple(inp.shape[:bd] + inp.shape[bd + 1:]) != L.in_shapes[c]
                       or tuple(o.shape[:bd] + o.shape[bd + 1:]) != L.out_shapes[c])
            if bad:
                drop.add(id(L.module))
                break
            if inp._version != iv and not L.clone_in[c]:
                clone_in.add((id(L.module), c))
            if o._version != ov and not L.clone_out[c]:
                clone_out.add((id(L.module), c))
    foreign = set(uses.foreign)
    if drop or clone_in or clone_out or foreign:
        what = []
        if drop:
            what.append(f"{len(drop)} layer(s) ran a different number of times or on other shapes than planned")
        if foreign:
            what.append(f"parameters used outside their layer: {sorted(foreign)}")
        if clone_in or clone_out:
            what.append("captured tensors changed in place")
        raise PlanMismatch("; ".join(what), drop=drop, foreign=foreign, clone_in=clone_in, clone_out=clone_out,
                           reprobe=bool(drop))
