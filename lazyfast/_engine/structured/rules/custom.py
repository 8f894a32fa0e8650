"""Registered (custom) rules: their per-example gradients, checked and flattened to gradient blocks.

The protocol is :mod:`lazyfast._engine.structured.rules.registry`'s; a custom rule has the one
contraction order of gradient blocks.
"""
from __future__ import annotations

import torch

from lazyfast._engine.structured.rules.registry import rule_for


def _custom_jac(L, cap):
    """A registered rule's per-example gradients (lazyfast/rules.py): [(n·k, P)] per parameter on."""
    rule = rule_for(L.module)
    grads = rule.per_example_gradients(L.module, cap)
    ps = [L.module._parameters.get(n) for n in rule.params]
    if not isinstance(grads, (list, tuple)) or len(grads) != len(ps):
        raise ValueError(f"the rule for {type(L.module).__name__} returned {type(grads).__name__} "
                         f"{len(grads) if isinstance(grads, (list, tuple)) else ''}: it must return one tensor "
                         f"(k, n, *param.shape) per parameter in {rule.params}")
    k, n = cap[0][1].shape[:2]
    out = []
    for name, p, g, on in zip(rule.params, ps, grads, (L.w_on, L.b_on)):
        if not on:
            continue
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != (k, n) + tuple(p.shape):
            raise ValueError(f"the rule for {type(L.module).__name__} returned for {name!r} "
                             f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}, expected "
                             f"(k, n, *param.shape) = {(k, n) + tuple(p.shape)}")
        out.append(g.detach().to(p.dtype).transpose(0, 1).reshape(n * k, -1))
    return out
