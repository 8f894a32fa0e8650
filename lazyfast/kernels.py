"""Tangent kernels of CNNs and other layered models (the authors' extraction layout), and centering.

:func:`layerwise_ntk` and :func:`extract_kernel` are thin uses of the structured engine
(:func:`lazyfast._engine.structured.structured_ntk`, docs/engine.md): one forward and one k-wide
batched backward capture every rule layer's inputs and output cotangents, and each layer
adds its exact kernel by the cheaper of per-example gradient blocks and position-pair Grams;
parameters no rule covers go to the generic path restricted to them.
:func:`extract_kernel` is the authors' (10N)×(10N) kernel (row = 10·n + class).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from lazyfast._deprecated import REMOVED_IN
from lazyfast._engine.generic import ntk_jacobian_blocked
from lazyfast._engine.state import check_independent
from lazyfast._engine.structured import CONTRACTIONS, structured_ntk
from lazyfast._validation import (DEFAULT_MEMORY_BUDGET, check_implementation, check_memory_budget,
                                  check_mode)
from lazyfast.lazy import frozen_copy

# layerwise_ntk(method=), the deprecated spelling of contraction=: old word → new word
_OLD_METHODS = {"auto": "auto", "jacobian": "gradients", "structured": "pairs"}


# ----------------------------------------------------------------------------- centering
class Centered(nn.Module):
    """h(w)(x) = model(x) − model₀(x) with model₀ a frozen copy of the initial model, so
    h(w₀) = 0 (the authors' CNN code: FC1(net(x)) − FC2(net2(x))). Only ``model`` trains; the
    frozen copy is :func:`lazyfast.lazy.frozen_copy`'s (eval mode, as ``LazyModel(center=True)``'s),
    and stays in eval mode."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.frozen = frozen_copy(model)

    def train(self, mode: bool = True):
        """Sets training mode of ``model``; the frozen copy always stays in eval mode."""
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x):
        return self.model(x) - self.frozen(x)


def centered(model: nn.Module) -> Centered:
    """Wraps ``model`` so its output at the current parameters is exactly zero."""
    return Centered(model)


def layerwise_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "full",
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, out_dtype: Optional[torch.dtype] = None,
                  contraction: str = "auto", flat: bool = False, info: Optional[dict] = None,
                  method: Optional[str] = None) -> torch.Tensor:
    """eNTK of any module by the structured engine, samples processed independently.

    Args:
        x1: (n1, ...); x2: (n2, ...) or None for x1.
        mode: ``"full"`` → (n1, n2, k, k) (or (n1·k, n2·k) with ``flat=True``, row = k·i + a);
            ``"trace"`` → (n1, n2).
        memory_budget: bytes of working memory (captures, factors, per-layer blocks).
        out_dtype: dtype of the result (accumulated in it); default the model's.
        contraction: each layer's contraction order: ``"auto"`` (per-layer FLOP choice),
            ``"gradients"`` (per-example gradient blocks) or ``"pairs"`` (position-pair Grams) for all layers;
            ``"matches"`` (pairs of per-sample rows of equal token) for the embeddings, the other layers
            as ``"auto"``.
        info: optional dict filled with the order chosen per layer (``contractions``), ``k``,
            ``layers`` and the ``remainder`` parameter names.
        method: deprecated spelling of ``contraction`` (``"jacobian"`` → ``"gradients"``,
            ``"structured"`` → ``"pairs"``); warns, removed in 0.3.
    """
    if method is not None:
        if method not in _OLD_METHODS:
            raise ValueError(f"method must be one of {tuple(_OLD_METHODS)}, got {method!r} (method= is deprecated: "
                             f"use contraction= with one of {CONTRACTIONS})")
        if contraction != "auto":
            raise TypeError("layerwise_ntk: pass contraction= only (method= is its deprecated spelling)")
        contraction = _OLD_METHODS[method]
        warnings.warn(f"layerwise_ntk(method={method!r}) is deprecated and will be removed in {REMOVED_IN}; use "
                      f"contraction={contraction!r} (the per-layer orders are now 'gradients' and 'pairs')",
                      FutureWarning, stacklevel=2)
    check_mode(mode)
    memory_budget = check_memory_budget(memory_budget)
    check_independent(model)
    return structured_ntk(model, x1, x2, mode=mode, memory_budget=memory_budget, out_dtype=out_dtype,
                          contraction=contraction, flat=flat, info=info)


def extract_kernel(model: nn.Module, x: torch.Tensor, *, implementation: str = "auto",
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, dtype: torch.dtype = torch.float64,
                   info: Optional[dict] = None) -> torch.Tensor:
    """The full empirical tangent kernel of ``model`` at its current parameters, as the
    authors extract it for the centered VGG-11: (N·k, N·k) with row = k·n + class, in
    ``dtype`` (float64 by default, as their stored kernel), gradients in the model's dtype.

    ``implementation``: ``"auto"`` or ``"structured"`` (the structured engine; 0.1: ``"layerwise"``), ``"jacobian"``
    (memory-bounded Jacobian contraction). Working memory stays within ``memory_budget``
    bytes. Example: ``extract_kernel(centered(vgg11()), images)``.
    """
    implementation = check_implementation(implementation, "extract_kernel")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch tensor (N, ...), got {getattr(x, 'shape', type(x).__name__)}")
    if implementation in ("auto", "structured"):
        return layerwise_ntk(model, x, mode="full", flat=True, memory_budget=memory_budget, out_dtype=dtype, info=info)
    check_independent(model)
    full = ntk_jacobian_blocked(model, x, mode="full", memory_budget=memory_budget)
    n, k = full.shape[0], full.shape[2]
    return full.permute(0, 2, 1, 3).reshape(n * k, n * k).to(dtype)
