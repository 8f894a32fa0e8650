"""Argument checks for the public API: clear errors that name the argument.

One layer used by every entry point (docs/contracts.md):

* :func:`check_bool`, :func:`check_int`, :func:`check_float`, :func:`check_tensor`,
  :func:`check_input`, :func:`check_memory_budget`, :func:`check_alpha`: each raises
  ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value) with a
  message that starts with the argument's name.
* NaN/inf checks: :func:`check_finite` tests any number of tensors with ONE fused
  reduction and one host synchronization; :func:`checks` (``lazyfast.checks``) turns the
  finite checks off for a block or for the process, so nothing synchronizes with the host
  and ``torch.compile`` traces an eNTK call without graph breaks.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from lazyfast._engine.state import functorch_wrapped as _functorch_wrapped

__all__ = ["checks", "finite_checks_enabled", "check_finite", "check_bool", "check_int", "check_float",
           "check_tensor", "check_input", "check_module", "check_device", "check_mode", "check_chunk_size",
           "check_positive_finite", "check_memory_budget", "check_alpha", "model_param_info"]

# ----------------------------------------------------------------------------- finite-check switch
# A plain module global (not a ContextVar) so that torch.compile reads it as a constant and
# guards on it: with checks off, the traced graph has no host synchronization.
_FINITE_CHECKS = os.environ.get("LAZYFAST_CHECK_FINITE", "1").strip().lower() not in ("0", "false", "no", "off")


def finite_checks_enabled() -> bool:
    """Whether NaN/inf checks of inputs and weights run (default True; environment
    variable ``LAZYFAST_CHECK_FINITE=0`` turns them off for the process)."""
    return _FINITE_CHECKS


class checks:
    """Turns lazyfast's NaN/inf input checks on or off.

    As a context manager (restores the previous setting on exit)::
        with lazyfast.checks(finite=False):
            K = torch.compile(lambda x: lazyfast.empirical_ntk(model, x), fullgraph=True)(x)

    or process-wide: ``lazyfast.checks.set(finite=False)``. Shape, dtype, device and type
    checks always run (they cost no host synchronization); only the finite checks, which
    read tensor values, can be turned off. With them off, NaN/inf inputs propagate into
    the results as torch's own ops would propagate them.
    """

    def __init__(self, finite: bool = True):
        self.finite = check_bool(finite, "finite")
        self._old = None

    @staticmethod
    def set(finite: bool = True) -> None:
        """Process-wide setting of the finite checks."""
        global _FINITE_CHECKS
        _FINITE_CHECKS = check_bool(finite, "finite")

    def __enter__(self):
        global _FINITE_CHECKS
        self._old = _FINITE_CHECKS
        _FINITE_CHECKS = self.finite
        return self

    def __exit__(self, *exc):
        global _FINITE_CHECKS
        _FINITE_CHECKS = self._old
        return False


def check_finite(**tensors) -> None:
    """Raises ``ValueError`` naming the first argument that holds NaN or inf.

    All tensors are tested with one fused reduction and ONE host synchronization (not one
    per tensor); skipped entirely when :func:`finite_checks_enabled` is False. ``None``
    values and integer tensors are ignored."""
    if not _FINITE_CHECKS:
        return
    names, flags = [], []
    for name, t in tensors.items():
        if t is None or not isinstance(t, torch.Tensor) or not t.numel():
            continue
        if not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
            continue
        if _functorch_wrapped(t):  # under vmap/grad the values are not concrete: nothing to read
            continue
        names.append(name)
        flags.append(torch.isfinite(t.detach()).all())
    if not flags:
        return
    if len(flags) == 1:
        ok = [bool(flags[0])]
    else:
        dev = flags[0].device
        ok = torch.stack([f.to(dev) for f in flags]).tolist()
    for name, good in zip(names, ok):
        if not good:
            raise ValueError(f"{name} contains NaN or infinite values")


# ----------------------------------------------------------------------------- scalars
def check_bool(value, name: str) -> bool:
    """A real ``bool`` (or numpy bool); strings such as ``'no'`` and ints are refused."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def check_int(value, name: str, *, minimum: Optional[int] = None, allow_none: bool = False) -> Optional[int]:
    """An ``int`` (not a bool, not a float) ≥ ``minimum``; ``None`` when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an int" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        what = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_float(value, name: str, *, positive: bool = False, nonnegative: bool = False, finite: bool = True,
                allow_none: bool = False, below: Optional[float] = None) -> Optional[float]:
    """A real number (int or float, not a bool, not a string) → float, optionally finite,
    > 0 (``positive``), ≥ 0 (``nonnegative``) and < ``below``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    req = ["finite"] if finite else ["not NaN"]
    if positive:
        req.append("> 0")
    if nonnegative:
        req.append(">= 0")
    if below is not None:
        req.append(f"< {below:g}")
    bad = (math.isnan(v) or (finite and math.isinf(v)) or (positive and not v > 0)
           or (nonnegative and not v >= 0) or (below is not None and not v < below))
    if bad:
        raise ValueError(f"{name} must be {' and '.join(req)}, got {value!r}")
    return v


def check_positive_finite(value, name: str) -> float:
    return check_float(value, name, positive=True)


# α² and 1/α² must be normal float64 numbers (the objective is R(αh)/α²).
ALPHA_RANGE = (1e-150, 1e150)


def check_alpha(value, name: str = "alpha", dtype: Optional[torch.dtype] = None) -> float:
    """α of the scaled objective R(α h)/α²: finite, > 0, and such that α² and 1/α² are
    representable (``ALPHA_RANGE``, else ``ValueError``). With ``dtype`` (the model's), an α
    whose α² overflows or underflows in that dtype raises ``ValueError`` too: the scaled
    output α·h or its loss would be inf or 0 without a word."""
    a = check_float(value, name, positive=True)
    lo, hi = ALPHA_RANGE
    if not lo <= a <= hi:
        raise ValueError(f"{name}={value!r} is outside [{lo:g}, {hi:g}]: {name}² or 1/{name}² would overflow or "
                         "underflow in float64, so the objective R(α·h)/α² would be 0, inf or NaN")
    if dtype is not None and dtype.is_floating_point and dtype != torch.float64:
        fi = torch.finfo(dtype)
        bound = math.sqrt(fi.max) / 16.0  # head-room for |h| and the loss's sum
        if not 1.0 / bound <= a <= bound:
            raise ValueError(f"{name}={value!r} is outside [{1 / bound:.3g}, {bound:.3g}] for a {dtype} model: "
                             f"{name}·h or its square loss would overflow or underflow in {dtype}; use float64")
    return a


# ----------------------------------------------------------------------------- one implementation= vocabulary
DEFAULT_MEMORY_BUDGET = 2 * 1024**3  # bytes of working memory every eNTK path may hold at once (the one default)

# Every ``implementation=`` of the public API takes its values from this one vocabulary (docs/engine.md,
# "One vocabulary"); each entry point accepts the subset that applies to it (IMPLEMENTATIONS_OF).
VOCABULARY = {
    "auto": "the cheapest applicable backend, by the FLOP model",
    "fused": "the compiled kernels of an exact TwoLayer",
    "structured": "the structured engine: exact per-layer rules, the rest by the generic path",
    "generic": "the generic path's own choice between jacobian and ntk_vp",
    "jacobian": "per-sample Jacobians (vmap(jacrev)), contracted; chunked over samples and parameter blocks",
    "ntk_vp": "one VJP + one JVP per kernel column; never holds a Jacobian",
    "dual": "one forward with forward-mode dual parameters and one backward (Linearized)",
    "cached": "the linearization kept as autograd graphs for a batch seen again (Linearized)",
    "products": "the public jvp / vjp at w0 on every call: fused kernels where they serve (Linearized)",
}
IMPLEMENTATIONS_OF = {
    "empirical_ntk": ("auto", "fused", "structured", "generic", "jacobian", "ntk_vp"),
    "products": ("auto", "fused", "generic"),  # jvp, vjp, ntk_vp
    "extract_kernel": ("auto", "structured", "jacobian"),
    "Linearized": ("auto", "dual", "cached", "products"),
}
# 0.1 values, accepted for one release with a FutureWarning
RENAMED_IMPLEMENTATIONS = {"products": {"reference": "generic"}, "extract_kernel": {"layerwise": "structured"},
                           "Linearized": {"ntk": "products"}}


def check_implementation(value, where: str) -> str:
    """``value`` as one of ``IMPLEMENTATIONS_OF[where]``; a 0.1 name warns and maps to its 0.2 name."""
    renamed = RENAMED_IMPLEMENTATIONS.get(where, {})
    if isinstance(value, str) and value in renamed:
        warnings.warn(f"implementation={value!r} is renamed {renamed[value]!r} in lazyfast 0.2; the old name is "
                      "removed in 0.3", FutureWarning, stacklevel=3)
        return renamed[value]
    allowed = IMPLEMENTATIONS_OF[where]
    if value not in allowed:
        raise ValueError(f"implementation must be one of {allowed}, got {value!r}")
    return value


def check_memory_budget(value, name: str = "memory_budget") -> int:
    """Bytes of working memory: a positive int (1e9 as a float is refused: pass int(1e9))."""
    return check_int(value, name, minimum=1)


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


# ----------------------------------------------------------------------------- modules and tensors
def model_param_info(model: nn.Module):
    """(device, dtype) of the model's first floating parameter (or None, None)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return None, None


def check_device(device, name: str = "device"):
    """None, or a device this torch can place tensors on: a bad string is a ValueError, and a CUDA
    device on a torch without CUDA (or without a visible GPU) is a ValueError saying so."""
    if device is None:
        return None
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise TypeError(f"{name} must be a str, an int or a torch.device, got {type(device).__name__} {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{name}={device!r} is not a device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch was built without CUDA" if not torch.backends.cuda.is_built() else "no GPU is visible"
        raise ValueError(f"{name}={device!r}: {why}; use device='cpu'")
    return dev


def check_module(model, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{name} has no parameters: its tangent kernel is empty")


def check_tensor(t, name: str, *, dims: Optional[Sequence[int]] = None, shape: Optional[Sequence] = None,
                 dtype: Optional[torch.dtype] = None, device=None, floating: bool = True,
                 finite: bool = False, like_name: str = "") -> torch.Tensor:
    """A tensor with ``dims`` dimensions, ``shape`` (entries None = any), ``dtype`` and
    ``device`` (``like_name`` says whose they are), floating-point when ``floating``, and
    free of NaN/inf when ``finite`` (subject to :func:`checks`)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dims is not None and t.dim() not in tuple(dims):
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    whose = f" of {like_name}" if like_name else ""
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must have the dtype{whose} {dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but must be on the device{whose} {device}")
    if finite:
        check_finite(**{name: t})
    return t


def check_input(x, name: str, model: Optional[nn.Module] = None, *, like: Optional[torch.Tensor] = None,
                finite: bool = True, allow_integer: bool = False, allow_grad: bool = True,
                like_name: str = "x1") -> torch.Tensor:
    """Checks a batch of inputs: a floating tensor with a batch dim, on the model's
    device and dtype, with the model's feature size (when the model declares one)
    or the same per-sample shape as ``like`` (named ``like_name`` in the message).

    ``allow_integer``: integer (non-bool) inputs (token ids, say) skip the floating-point
    and dtype-equals-model checks. ``allow_grad=False`` refuses an ``x`` that requires grad
    (entry points whose result is not differentiable in x). ``finite``: NaN/inf check
    (subject to :func:`checks`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    integer = allow_integer and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    if not integer and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension and at least one feature dimension, got shape {tuple(x.shape)}")
    if not allow_grad and x.requires_grad:
        raise ValueError(f"{name} requires grad, but this result is not differentiable with respect to the inputs; "
                         f"pass {name}.detach()")
    if model is not None:
        dev, dt = model_param_info(model)
        if dev is not None and x.device != dev:
            raise ValueError(f"{name} is on {x.device} but the model's parameters are on {dev}")
        if not integer and dt is not None and x.dtype != dt:
            raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters have dtype {dt}")
        d = getattr(model, "in_features", None)
        if integer and d is not None:
            raise TypeError(f"{name} must be a floating-point tensor for this model (it takes {d} real features), "
                            f"got dtype {x.dtype}; integer inputs are for models that take them (token ids)")
        if d is not None and (x.dim() != 2 or x.shape[1] != d):
            raise ValueError(f"{name} must have shape (n, {d}) for this model, got {tuple(x.shape)}")
    if like is not None and x.shape[1:] != like.shape[1:]:
        raise ValueError(f"{name} has per-sample shape {tuple(x.shape[1:])} but {like_name} has "
                         f"{tuple(like.shape[1:])}")
    if finite and not integer:
        check_finite(**{name: x})
    return x


def probe_out_features(model: nn.Module, x: torch.Tensor) -> int:
    """Number of outputs k of ``model`` per sample, from ``model.out_features`` or one forward
    on (at most two of) the samples of ``x`` that changes nothing: buffers (BatchNorm running
    statistics, counters) are copies, the global random stream is restored, no graph is kept.
    Raises ``ValueError`` for an empty ``x`` when the model declares no ``out_features``."""
    k = getattr(model, "out_features", None)
    if k is not None:
        return int(k)
    if x.shape[0] == 0:
        raise ValueError("the inputs are empty and the model declares no out_features: its number of outputs "
                         "k is unknown; give at least one sample")

    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        out = functional_call(model, buffers, (x[:2],), strict=False)
    return int(out.reshape(out.shape[0], -1).shape[1])
