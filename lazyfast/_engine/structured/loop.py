"""The engine's entry point ``structured_ntk``: the chunk / panel loop, plus the generic remainder.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lazyfast._engine.generic import generic_ntk, math_attention
from lazyfast._engine.state import StateGuard
from lazyfast._engine.structured.contract import _contract
from lazyfast._engine.structured.factors import _factors
from lazyfast._engine.structured.plan import (CONTRACTIONS, Plan, PlanMismatch, make_plan, probe_plan, remember_plan,
                                              revise_plan)
from lazyfast._engine.structured.schedule import DEFAULT_MEMORY_BUDGET, PLAN_ATTEMPTS, _schedule, capture_chunk


def structured_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, chunk_size: Optional[int] = None,
                   contraction: str = "auto", out_dtype: Optional[torch.dtype] = None, flat: bool = False,
                   info: Optional[dict] = None, batched: bool = True, plan: Optional[Plan] = None,
                   remainder: str = "auto") -> torch.Tensor:
    """Exact eNTK of any module by per-layer rules plus the generic path for the rest.

    Args:
        x1: (n1, ...); x2: (n2, ...) or None for x1 (only chunk pairs J ≥ I are computed).
        mode: ``"trace"`` → (n1, n2) = (1/k)·Σ_a Θ_aa; ``"full"`` → (n1, n2, k, k), or
            (n1·k, n2·k) with row k·i + a when ``flat=True``.
        memory_budget: bytes of working memory (captures, factors, per-layer blocks); samples
            are chunked to stay within it.
        chunk_size: caps the samples per chunk.
        contraction: per-layer contraction order: ``"auto"`` (FLOP model), ``"gradients"``
            (per-example gradient blocks) or ``"pairs"`` (position-pair Grams) for every layer;
            ``"matches"`` (pairs of per-sample rows of equal token) for the embeddings, the other
            layers as ``"auto"``.
        out_dtype: dtype the kernel is accumulated and returned in (default the model's).
        info: filled with ``contractions`` (per rule layer), ``layers`` (module class names),
            ``remainder`` (parameter names left to the generic path), ``k``, ``chunk``.
        batched: one batched backward for the k outputs (False: a loop over the outputs).
        remainder: implementation of the generic path for uncovered parameters.

    Returns a plain tensor (no autograd graph). The caller has checked ``mode``, ``memory_budget``
    and :func:`check_independent`.
    """
    if contraction not in CONTRACTIONS:
        raise ValueError(f"contraction must be one of {CONTRACTIONS}, got {contraction!r}")
    # mode, memory_budget and the samples' independence are the public caller's to check, once
    # (lazyfast.empirical_ntk, kernels.layerwise_ntk, the MLP backend): this is their shared engine.
    same = x2 is None
    xb = x1 if same else x2
    n1, n2 = x1.shape[0], xb.shape[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters (requires_grad=True): its tangent kernel is empty")
    dtype = trainable[0].dtype
    out_dtype = out_dtype or dtype
    xp = x1 if n1 else xb

    def compute(plan):
        k = plan.k
        if info is not None:
            info.update(k=k, layers=[type(L.module).__name__ for L in plan.layers], remainder=list(plan.remainder))
        if n1 == 0 or n2 == 0:
            shape = (n1 * k, n2 * k) if (mode == "full" and flat) else (n1, n2) if mode == "trace" else (n1, n2, k, k)
            if info is not None:
                info.update(contractions=[], chunk=0)
            return torch.zeros(shape, dtype=out_dtype, device=x1.device)
        itemsize = torch.empty((), dtype=dtype).element_size()
        budget = max(1, memory_budget // itemsize)
        rows = k if mode == "full" else 1
        acc = torch.zeros(n1 * rows, n2 * rows, dtype=out_dtype, device=x1.device)
        if plan.layers:
            n_max = max(n1, n2)
            c0 = min(n_max, chunk_size or n_max)
            c, panel = _schedule(plan, n1, n2, same, budget, c0, mode, contraction)
            if info is not None:
                info.update(contractions=[L.contraction for L in plan.layers], chunk=c, panel=panel,
                            cached=panel >= n1 and same)
            starts1 = list(range(0, n1, c))
            starts2 = starts1 if same else list(range(0, n2, c))
            step = max(1, panel // c)  # x1 chunks per panel
            if same and len(starts1) == 1:  # one chunk: each layer is contracted as soon as it is formed
                def sink(f):
                    with torch.no_grad():
                        _contract(acc, f, None, k, mode, budget, contraction)

                _factors(model, plan, x1, batched, sink=sink)
                starts1 = []
            cc = capture_chunk(plan, c)
            for p0 in range(0, len(starts1), step):
                # the panel's factors are captured once and held; x2's chunks stream past them
                held = {i: _factors(model, plan, x1[starts1[i]:min(starts1[i] + c, n1)], batched, capture_chunk=cc)
                        for i in range(p0, min(p0 + step, len(starts1)))}
                for j in range(p0 if same else 0, len(starts2)):
                    s2 = starts2[j]
                    e2 = min(s2 + c, n2)
                    f2 = held[j] if (same and j in held) else _factors(model, plan, xb[s2:e2], batched,
                                                                       capture_chunk=cc)
                    with torch.no_grad():
                        for i, f1 in held.items():
                            if same and i > j:
                                continue
                            s1 = starts1[i]
                            e1 = min(s1 + c, n1)
                            blk = torch.zeros((e1 - s1) * rows, (e2 - s2) * rows, dtype=out_dtype, device=x1.device)
                            _contract(blk, f1, None if (same and i == j) else f2, k, mode, budget, contraction)
                            acc[s1 * rows:e1 * rows, s2 * rows:e2 * rows] = blk
                            if same and i != j:
                                acc[s2 * rows:e2 * rows, s1 * rows:e1 * rows] = blk.T
                    del f2
                held.clear()
        elif info is not None:
            info.update(contractions=[], chunk=0)
        if plan.remainder:
            kw = dict(mode=mode, memory_budget=memory_budget, names=plan.remainder, k=k,
                      forward_flops=plan.forward_flops, act_numel=plan.act_numel)
            try:
                rest = generic_ntk(model, x1, x2, implementation=remainder, **kw)
            except ValueError as e:
                # per-sample vmap cannot follow the forward (e.g. Hugging Face GPT-2 branches on
                # `pad_token_id in input_ids`): NTK-vector products vmap over cotangent columns
                # instead, with the samples unbatched (attention by SDPA's math backend, whose
                # forward-mode derivative exists)
                if remainder == "ntk_vp" or "cannot differentiate this model" not in str(e):
                    raise
                with math_attention():
                    rest = generic_ntk(model, x1, x2, implementation="ntk_vp", **kw)
                if info is not None:
                    info["remainder_fallback"] = f"ntk_vp ({str(e).splitlines()[0][:120]})"
            if mode == "full":
                acc += rest.permute(0, 2, 1, 3).reshape(acc.shape).to(out_dtype)
            else:
                acc += (rest * k).to(out_dtype)

        return acc, k

    with StateGuard(model):
        if plan is None:
            plan = make_plan(model, xp)
        for attempt in range(PLAN_ATTEMPTS):
            try:
                res = compute(plan)
                break
            except PlanMismatch as mm:
                if attempt == PLAN_ATTEMPTS - 1:
                    raise RuntimeError(f"lazyfast internal error: the plan still disagrees with the real call after "
                                       f"{attempt} revisions ({mm.reason}); use implementation='jacobian'") from mm
                plan = probe_plan(model, xp) if (mm.reprobe and attempt == 0) else revise_plan(plan, mm)
                remember_plan(model, xp, plan)
                if info is not None:
                    info.setdefault("revisions", []).append(mm.reason)
        if not isinstance(res, tuple):
            return res
        acc, k = res
    with torch.no_grad():
        if same:  # exact symmetry
            acc = 0.5 * (acc + acc.T)
        if mode == "trace":
            return (acc / k).detach()
        if flat:
            return acc.detach()
        return acc.reshape(n1, k, n2, k).permute(0, 2, 1, 3).contiguous().detach()
