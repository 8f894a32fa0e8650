"""The eNTK of a :class:`lazyfast.models.MLP` by the structured engine (its 2-D linear layers go through
the fused ``hadamard_gram_sum`` op)."""
from __future__ import annotations

from typing import Optional

import torch

from lazyfast._engine.structured import structured_ntk
from lazyfast._validation import DEFAULT_MEMORY_BUDGET, check_chunk_size, check_input, check_memory_budget, check_mode
from lazyfast.models import MLP


def mlp_ntk(mlp, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
            chunk_size: Optional[int] = None, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """Structured eNTK of a :class:`lazyfast.models.MLP` (any depth, activation, bias,
    parametrization, k ≥ 1, frozen parameters) by the structured engine.

    Args:
        mlp: the network. x1: (n1, d). x2: (n2, d) or None for x1.
        mode: ``"trace"`` → (n1, n2); ``"full"`` → (n1, n2, k, k).
        chunk_size: samples whose factors are held at once (None: from ``memory_budget``).

    Samples are processed in chunks; in the symmetric case only chunk pairs (I, J)
    with J ≥ I are computed and the rest is mirrored. Returns a plain tensor.
    """
    if not isinstance(mlp, MLP):
        raise TypeError(f"mlp must be a lazyfast.models.MLP, got {type(mlp).__name__}")
    check_mode(mode)
    memory_budget = check_memory_budget(memory_budget)
    check_input(x1, "x1", mlp)
    if x2 is not None:
        check_input(x2, "x2", mlp, like=x1)
    chunk_size = check_chunk_size(chunk_size)
    return structured_ntk(mlp, x1, x2, mode=mode, chunk_size=chunk_size, memory_budget=memory_budget)
