"""Offline data: synthetic teacher–student problems (the paper's two-layer setups).

No function in lazyfast downloads anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def sphere(n: int, d: int, *, generator: Optional[torch.Generator] = None, dtype=torch.float64) -> torch.Tensor:
    """n points uniform on the unit sphere S^{d-1}: (n, d)."""
    if n < 0 or d < 1:
        raise ValueError(f"need n >= 0 and d >= 1, got n={n}, d={d}")
    x = torch.randn(n, d, generator=generator, dtype=dtype)
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


@dataclass
class Teacher:
    """Teacher f*(x) = Σ_k a_k relu(b_k·x) with unit-norm rows b_k and a_k = ±1."""

    weight: torch.Tensor  # (m0, d) rows of unit norm
    out: torch.Tensor  # (m0,) signs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weight.T) @ self.out


def relu_teacher(d: int, m0: int = 3, *, generator: Optional[torch.Generator] = None, dtype=torch.float64) -> Teacher:
    """The authors' teacher: m0 neurons, directions uniform on the sphere, output weights ±1."""
    w = torch.randn(m0, d, generator=generator, dtype=dtype)
    w = w / w.norm(dim=1, keepdim=True)
    a = torch.sign(torch.randn(m0, generator=generator, dtype=dtype))
    a[a == 0] = 1
    return Teacher(w, a)


def teacher_student(n_train: int, n_test: int, d: int, m0: int = 3, *, seed: int = 0, dtype=torch.float64):
    """Noiseless teacher–student regression data on the sphere.

    Returns a dict with ``x_train`` (n_train, d), ``y_train`` (n_train, 1), ``x_test``,
    ``y_test`` and the ``teacher``.
    """
    g = torch.Generator().manual_seed(int(seed))
    teacher = relu_teacher(d, m0, generator=g, dtype=dtype)
    x_train = sphere(n_train, d, generator=g, dtype=dtype)
    x_test = sphere(n_test, d, generator=g, dtype=dtype)
    return {
        "x_train": x_train,
        "y_train": teacher(x_train).unsqueeze(1),
        "x_test": x_test,
        "y_test": teacher(x_test).unsqueeze(1),
        "teacher": teacher,
    }
