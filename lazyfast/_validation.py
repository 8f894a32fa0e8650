"""Argument checks for the public API: clear errors that name the argument."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def model_param_info(model: nn.Module):
    """(device, dtype) of the model's first floating parameter (or None, None)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return None, None


def check_module(model, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{name} has no parameters: its tangent kernel is empty")


def check_input(x, name: str, model: Optional[nn.Module] = None, *, like: Optional[torch.Tensor] = None,
                finite: bool = True, allow_integer: bool = False) -> torch.Tensor:
    """Checks a batch of inputs: a floating tensor with a batch dim, on the model's
    device and dtype, with the model's feature size (when the model declares one)
    or the same per-sample shape as ``like``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    integer = allow_integer and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    if not x.is_floating_point() and not integer:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension and at least one feature dimension, got shape {tuple(x.shape)}")
    if model is not None:
        dev, dt = model_param_info(model)
        if dev is not None and x.device != dev:
            raise ValueError(f"{name} is on {x.device} but the model's parameters are on {dev}")
        if dt is not None and x.dtype != dt and not integer:
            raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters have dtype {dt}")
        d = getattr(model, "in_features", None)
        if d is not None and (x.dim() != 2 or x.shape[1] != d):
            raise ValueError(f"{name} must have shape (n, {d}) for this model, got {tuple(x.shape)}")
    if like is not None and x.shape[1:] != like.shape[1:]:
        raise ValueError(f"{name} has per-sample shape {tuple(x.shape[1:])} but x1 has {tuple(like.shape[1:])}")
    if finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_mode(mode: str) -> str:
    if mode not in ("trace", "full"):
        raise ValueError(f"mode must be 'trace' or 'full', got {mode!r}")
    return mode


def check_chunk_size(chunk_size) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def check_positive_finite(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v
