"""Operator rules: recognising a rule op in a forward (``match_op``) and the module-shaped shells its sites hold.

Rules keyed on what the forward computes (docs/engine.md, "Operator rules"): a recognized op that
takes trainable parameters in its weight / bias slots is a rule site, whatever module calls it
(timm's LayerNorm2d, BatchNormAct2d, a layer-scale ``x * gamma``, Hugging Face's Conv1D addmm).
:class:`lazyfast._engine.uses.ParamUses` watches the forward with :func:`match_op`; a site holds a
shell (:func:`_op_shell`) so the module rules' factor code serves it.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from lazyfast._engine.structured.rules.linear import _LinearT
from lazyfast._engine.structured.rules.scale import _ScaleShift
from lazyfast._engine.uses import _tensors

_NORM_FUNCS = ("layer_norm", "group_norm", "batch_norm")
_MUL = frozenset({"mul", "__mul__", "__rmul__", "multiply"})
_ADD = frozenset({"add", "__add__", "__radd__"})
_BROADCAST = frozenset({"expand", "expand_as", "broadcast_to"})
OP_NAMES = frozenset(_NORM_FUNCS) | _MUL | _ADD | _BROADCAST | {"addmm", "linear"}
_SIGS: dict = {}


def _bind(func, args, kwargs):
    sig = _SIGS.get(func)
    if sig is None:
        sig = _SIGS[func] = inspect.signature(func)
    ba = sig.bind(*args, **kwargs)
    ba.apply_defaults()
    return ba.arguments


def match_op(name: str, func, args, kwargs, is_param):
    """(kind, input, weight, bias, meta) when ``func(*args, **kwargs)`` is a recognized op whose
    parameter slots hold parameters ``is_param`` accepts (and nothing else there), else None.
    kind: ``layer_norm`` | ``group_norm`` | ``batch_norm`` (eval statistics) | ``scale``
    (x * γ, γ broadcast into x) | ``shift`` (x + β) | ``linear_t`` (addmm(b, x, W), W (in, out)) |
    ``linear`` (``F.linear(x, W, b)``, W (out, in), x of any rank: timm's ``Linear``, any module whose
    own forward calls it) | ``broadcast`` (``β.expand(n, ...)``, ``expand_as``, ``torch.broadcast_to``:
    a parameter repeated over the batch, as a class token; a shift of zero, its input None: the
    watcher records the call's output in its place)."""
    if name not in OP_NAMES:
        return None
    if name in _NORM_FUNCS and getattr(func, "__module__", "") == "torch.nn.functional":
        try:
            a = _bind(func, args, kwargs)
        except TypeError:
            return None
        w, b = a.get("weight"), a.get("bias")
        if not (is_param(w) or is_param(b)) or (w is not None and not is_param(w)) or \
                (b is not None and not is_param(b)):
            return None
        inp = a.get("input")
        if not isinstance(inp, torch.Tensor):
            return None
        if name == "layer_norm":
            meta = {"normalized_shape": tuple(a["normalized_shape"]), "eps": a["eps"]}
        elif name == "group_norm":
            meta = {"num_groups": a["num_groups"], "eps": a["eps"]}
        else:
            if a["training"] or a["running_mean"] is None or a["running_var"] is None:
                return None
            meta = {"running_mean": a["running_mean"], "running_var": a["running_var"], "eps": a["eps"]}
        return name, inp, w, b, meta
    if name in _MUL or name in _ADD:
        if len(args) != 2 or kwargs:
            return None
        x, y = args
        if is_param(x) and isinstance(y, torch.Tensor) and not is_param(y):
            p, other = x, y
        elif is_param(y) and isinstance(x, torch.Tensor) and not is_param(x):
            p, other = y, x
        else:
            return None
        try:
            if tuple(torch.broadcast_shapes(p.shape, other.shape)) != tuple(other.shape) or p.dim() > other.dim():
                return None
        except RuntimeError:
            return None
        if name in _MUL:
            return "scale", other, p, None, {}
        return "shift", other, None, p, {}
    if name in _BROADCAST:
        if not args or not is_param(args[0]) or any(is_param(t) for t in list(_tensors(args[1:])) + list(_tensors(kwargs))):
            return None
        return "broadcast", None, None, args[0], {}
    if name == "addmm" and getattr(func, "__module__", "") == "torch":
        if len(args) != 3 or kwargs:
            return None
        b, x, W = args
        if not is_param(W) or W.dim() != 2 or not isinstance(x, torch.Tensor) or x.dim() != 2 or \
                (b is not None and not is_param(b)) or (b is not None and tuple(b.shape) != (W.shape[1],)):
            return None
        return "linear_t", x, W, b, {}
    if name == "linear" and getattr(func, "__module__", "") == "torch._C._nn":
        if len(args) + len(kwargs) > 3 or set(kwargs) - {"input", "weight", "bias"}:
            return None
        slots = dict(zip(("input", "weight", "bias"), args), **kwargs)
        x, W, b = slots.get("input"), slots.get("weight"), slots.get("bias")
        if not is_param(W) or W.dim() != 2 or not isinstance(x, torch.Tensor) or x.dim() < 1 or \
                x.shape[-1] != W.shape[1] or (b is not None and not is_param(b)) or \
                (b is not None and tuple(b.shape) != (W.shape[0],)):
            return None
        return "linear", x, W, b, {}
    return None


def _op_shell(kind: str, w, b, meta: dict) -> nn.Module:
    """A module-shaped holder of an operator rule's parameters and arguments, so the module rules'
    factor code serves it (it shares the parameters; it is never called)."""
    if kind == "linear_t":
        return _LinearT(w, b)
    if kind == "linear":
        sh = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(sh)
        sh._parameters["weight"], sh._parameters["bias"] = w, b
        sh.in_features, sh.out_features = w.shape[1], w.shape[0]
        return sh
    if kind in ("scale", "shift", "broadcast"):
        return _ScaleShift(w, b, meta.get("view_shape"))
    cls = {"layer_norm": nn.LayerNorm, "group_norm": nn.GroupNorm, "batch_norm": nn.BatchNorm2d}[kind]
    sh = cls.__new__(cls)
    nn.Module.__init__(sh)
    sh._parameters["weight"] = w
    sh._parameters["bias"] = b
    sh.eps = meta["eps"]
    if kind == "layer_norm":
        sh.normalized_shape = tuple(meta["normalized_shape"])
        sh.elementwise_affine = True
    elif kind == "group_norm":
        sh.num_groups = meta["num_groups"]
        sh.affine = True
    else:
        sh._buffers["running_mean"] = meta["running_mean"]
        sh._buffers["running_var"] = meta["running_var"]
        sh.momentum, sh.track_running_stats, sh.affine = 0.0, True, True
    sh.training = False
    return sh


_OP_KIND = {"layer_norm": "norm", "group_norm": "norm", "batch_norm": "norm", "linear_t": "linear", "linear": "linear",
            "scale": "scale", "shift": "shift", "broadcast": "shift"}
