"""The generic eNTK path for any ``nn.Module`` (DESIGN.md §1.3), memory-bounded.

* ``"jacobian"``: Jacobian contraction chunked over samples AND parameter blocks
  (:func:`lazyfast.reference.ntk_jacobian_blocked`), never holding more than the budget.
* ``"ntk_vp"``: one VJP + one JVP per kernel column, columns vmapped in chunks sized to
  the budget (:func:`lazyfast.reference.ntk_ntkvp`).
* ``"auto"``: the cheaper of the two by a FLOP model with the forward cost measured
  (:func:`lazyfast.reference.generic_costs`): contraction wins for few outputs, NTK-vector
  products when k·P is large relative to the forward cost.
For CNNs made of Conv2d/Linear layers, :func:`lazyfast.kernels.layerwise_ntk` is faster still.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lazyfast import reference


def choose_generic_implementation(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor], mode: str,
                                  memory_budget: int) -> str:
    """``"jacobian"`` or ``"ntk_vp"``, whichever the FLOP model says is cheaper."""
    costs = reference.generic_costs(model, x1, x2, mode, memory_budget)
    return "jacobian" if costs["jacobian"] <= costs["ntk_vp"] else "ntk_vp"


def generic_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
                implementation: str = "auto", chunk_size: Optional[int] = None,
                memory_budget: int = 2 * 1024**3) -> torch.Tensor:
    """eNTK of any module within ``memory_budget`` bytes of working memory.

    ``chunk_size``: samples per Jacobian chunk (``"jacobian"``) or kernel columns per
    vmapped batch (``"ntk_vp"``); None sizes it from the budget.
    Shapes: x1 (n1, ...), x2 (n2, ...) or None → (n1, n2) trace | (n1, n2, k, k) full.
    """
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
    if implementation == "auto":
        if x1.shape[0] == 0 or (x2 is not None and x2.shape[0] == 0):
            implementation = "jacobian"
        else:
            implementation = choose_generic_implementation(model, x1, x2, mode, memory_budget)
    if implementation == "ntk_vp":
        if chunk_size is None and x1.shape[0]:
            chunk_size = reference.ntkvp_column_chunk(model, x1, x1 if x2 is None else x2, memory_budget)
        return reference.ntk_ntkvp(model, x1, x2, mode=mode, chunk_size=chunk_size)
    if implementation == "jacobian":
        return reference.ntk_jacobian_blocked(model, x1, x2, mode=mode, memory_budget=memory_budget,
                                              chunk_size=chunk_size)
    raise ValueError(f"implementation must be 'auto', 'jacobian' or 'ntk_vp', got {implementation!r}")
