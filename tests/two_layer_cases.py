"""Shared builders for the two-layer op tests (CPU and CUDA)."""
from __future__ import annotations

import torch

from lazyfast.models import TwoLayer


def make_model(d, m, k, activation="relu", bias=False, dtype=torch.float64, device="cpu", scale="ntk"):
    torch.manual_seed(1000 + 7 * d + 13 * m + k)
    return TwoLayer(d, m, k, activation=activation, bias=bias, dtype=dtype, device=device, scale=scale)


def weights(model):
    A = model.hidden.weight.detach()
    B = model.output.weight.detach()
    c = None if model.hidden.bias is None else model.hidden.bias.detach()
    return A, c, B


def inputs(n, d, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def tangents(T, m, d, k, dtype=torch.float64, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)  # noqa: E731
    return mk(T, m, d), mk(T, m), mk(T, k, m)


def upcast(*ts):
    return [None if t is None else t.detach().to(torch.float64) for t in ts]
