"""Model-state utilities: samples independent, state unchanged, PyTorch's fused MHA fast path off.

Imports no other lazyfast module: every backend uses these, and nothing here depends on a backend.
"""
from __future__ import annotations

import copy
import threading

from typing import Dict

import torch
from torch import nn
from torch.nn.modules import module as _mod
from torch.nn.utils import parametrize


def functorch_wrapped(t: torch.Tensor) -> bool:
    """True for a tensor seen inside ``vmap`` / ``grad`` (its values are not concrete)."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # pragma: no cover - older torch
        return False


def check_independent(model: nn.Module) -> None:
    """Raises ValueError if a module couples the samples of a batch or is random (BatchNorm
    in training mode or without running statistics, active dropout), would update its state
    in the forward (InstanceNorm tracking statistics in training mode), or rewrites its
    weights (``nn.Embedding(max_norm=...)``)."""
    bad = []
    for name, m in model.named_modules():
        label = f"{type(m).__name__} {name or '<model>'!r}"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training:
                bad.append(f"{label} is in training mode (batch statistics)")
            elif m.running_mean is None:
                bad.append(f"{label} has track_running_stats=False (batch statistics even in eval mode)")
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
            if m.training and m.track_running_stats:
                bad.append(f"{label} is in training mode (it updates running statistics)")
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            if m.training and m.p > 0:
                bad.append(f"{label} is active (training mode, p={m.p})")
        elif isinstance(m, nn.MultiheadAttention):
            if m.training and m.dropout > 0:
                bad.append(f"{label} applies attention dropout (training mode, dropout={m.dropout})")
        elif isinstance(m, nn.RNNBase):
            if m.training and m.dropout > 0:
                bad.append(f"{label} applies dropout (training mode, dropout={m.dropout})")
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            raise ValueError(f"{label} has max_norm={m.max_norm}: its forward renormalizes the weight in place, "
                             "so computing the kernel would change the model; use max_norm=None")
    if bad:
        raise ValueError("the eNTK needs samples processed independently and deterministically, but "
                         + "; ".join(bad) + ". Call model.eval() before computing the kernel")


class StateGuard:
    """Context manager: the model's buffers, training flags and plain attributes (numbers,
    strings, flags and short lists / tuples / dicts of them, e.g. a step counter) are the same
    after as before. A forward that changed a buffer or a plain attribute is undone and reported
    (ValueError naming what changed); a forward that changed a parameter in place is reported.

    Re-entrant: a guard entered while a guard of the same model is open on this thread (the public
    call's guard around the engine's own) does nothing, so buffers are cloned once per call, and the
    outermost guard checks and restores everything."""

    _open = threading.local()

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        open_ = self._open.__dict__.setdefault("ids", set())
        self.inner = id(self.model) in open_
        if self.inner:
            return self
        open_.add(id(self.model))
        self.fast = no_fastpath().__enter__()
        self.bufs = [(n, b, b._version, b.detach().clone()) for n, b in self.model.named_buffers()]
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.params = [(n, p, p._version) for n, p in self.model.named_parameters()]
        self.attrs = [(name, m, _plain_attrs(m)) for name, m in self.model.named_modules()]
        return self

    def __exit__(self, *exc):
        if self.inner:
            return False
        self._open.ids.discard(id(self.model))
        self.fast.__exit__(*exc)
        changed = []
        for n, b, v, saved in self.bufs:
            if b._version != v:
                with torch.no_grad():
                    b.copy_(saved)
                changed.append(n)
        for m, t in self.flags:
            if m.training != t:
                m.train(t)
        for name, m, before in self.attrs:
            after = _plain_attrs(m)
            key = lambda d, a: d[a][0] if a in d else _MISSING  # noqa: E731
            if after.keys() != before.keys() or any(key(after, a) != key(before, a) for a in before):
                for a in sorted(set(before) | set(after)):
                    if key(before, a) != key(after, a):
                        if a in before:
                            object.__setattr__(m, a, copy.deepcopy(before[a][1]))
                        else:
                            m.__dict__.pop(a, None)
                        old, new = before.get(a, (None, "<unset>"))[1], after.get(a, (None, "<unset>"))[1]
                        changed.append(f"{(name + '.') if name else ''}{a}: {old!r} -> {new!r}")
        moved = [n for n, p, v in self.params if p._version != v]
        if exc[0] is None and (changed or moved):
            raise ValueError(f"the model's forward changed its state ({', '.join(changed + moved)}; buffers and "
                             "attributes restored): the eNTK is the derivative of one fixed function, so it needs a "
                             "forward without side effects (a step counter or a cache in forward, BatchNorm in "
                             "training mode: call model.eval(), move the state out of forward)")
        return False


_MISSING = object()


def _plain_attrs(m: nn.Module) -> dict:
    """The module's public plain attributes: name → (frozen value for comparison, a copy)."""
    return {a: (_frozen(v), copy.deepcopy(v) if isinstance(v, (list, dict)) else v)
            for a, v in m.__dict__.items() if not a.startswith("_") and a not in ("training", "forward")
            and _simple(v)}


class no_fastpath:
    """Context manager: PyTorch's fused inference fast path of ``nn.TransformerEncoderLayer`` /
    ``nn.MultiheadAttention`` off, so every forward of the engine (probe, capture, torch.func
    transforms, whose detached parameters would otherwise select it) runs the same
    differentiable ops (the fused op has no forward-mode AD and hides the layers' calls)."""

    def __enter__(self):
        self.old = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        return self

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.old)
        return False


_SIMPLE = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _simple(v, depth: int = 2) -> bool:
    """Plain values (numbers, strings, dtypes, devices) and short lists / tuples / dicts of them."""
    if isinstance(v, _SIMPLE):
        return True
    if depth and isinstance(v, (tuple, list)) and len(v) <= 64:
        return all(_simple(e, depth - 1) for e in v)
    if depth and isinstance(v, dict) and len(v) <= 64:
        return all(isinstance(k, str) and _simple(e, depth - 1) for k, e in v.items())
    return False


def _frozen(v):
    if isinstance(v, list):
        return ("list",) + tuple(_frozen(e) for e in v)
    if isinstance(v, dict):
        return ("dict",) + tuple((k, _frozen(e)) for k, e in v.items())
    if isinstance(v, tuple):
        return tuple(_frozen(e) for e in v)
    return v


def unmodified(model, cls, children: Dict[str, type]) -> bool:
    """True if ``model`` is exactly a ``cls`` (not a subclass), with its class's own ``forward``,
    the submodules ``children`` (attribute → exact type, unmodified), and no forward or
    backward hooks on it or any submodule (global module hooks included): a closed-form
    kernel of ``cls`` then computes the derivatives of the forward that actually runs."""
    if type(model) is not cls or "forward" in model.__dict__:
        return False
    for attr, typ in children.items():
        sub = getattr(model, attr, None)
        if type(sub) is not typ or "forward" in sub.__dict__:
            return False
    for m in model.modules():
        if parametrize.is_parametrized(m) or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks \
                or getattr(m, "_backward_pre_hooks", None):
            return False
    return not (_mod._global_forward_hooks or _mod._global_forward_pre_hooks or _mod._global_backward_hooks
                or getattr(_mod, "_global_backward_pre_hooks", None))
