"""The fused two-layer backend: the compiled two-layer ops (:mod:`lazyfast._ops.two_layer`) applied to
an exact :class:`lazyfast.models.TwoLayer` (no subclass, no hooks, every parameter trainable).
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from lazyfast._engine.products import check_tangents
from lazyfast._engine.state import unmodified
from lazyfast._validation import check_finite
from lazyfast._ops.two_layer import _PARAM_NAMES, two_layer_jvp, two_layer_ntk, two_layer_ntk_vp, two_layer_vjp
from lazyfast.models import TwoLayer


def fused_applicable(model) -> bool:
    """True for an exact :class:`TwoLayer` (no subclass, ``forward`` not overridden, no hooks)
    whose parameters are all trainable: the fused kernels then compute exactly the eNTK of
    A, c, B that the generic references compute."""
    return unmodified(model, TwoLayer, {"hidden": nn.Linear, "output": nn.Linear}) and all(
        p.requires_grad for p in model.parameters())


def model_weights(model: TwoLayer) -> dict:
    """Keyword arguments A, B, c, scale, activation of the ``two_layer_*`` ops for a
    :class:`TwoLayer` (weights detached)."""
    if not isinstance(model, TwoLayer):
        raise TypeError(f"model must be a lazyfast.models.TwoLayer, got {type(model).__name__}")
    bias = model.hidden.bias
    return dict(A=model.hidden.weight.detach(), B=model.output.weight.detach(),
                c=None if bias is None else bias.detach(), scale=model.scale, activation=model.activation)


def model_ntk(model: TwoLayer, x1, x2=None, mode="trace"):
    """:func:`two_layer_ntk` at the parameters of ``model``."""
    return two_layer_ntk(x1, x2, mode=mode, **model_weights(model))


def model_jvp(model: TwoLayer, x, tangents: Dict[str, torch.Tensor]):
    """:func:`two_layer_jvp` with tangents keyed by parameter name
    (``hidden.weight``, ``hidden.bias``, ``output.weight``) → (T, n, k)."""
    w = model_weights(model)
    check_tangents(dict(model.named_parameters()), tangents)
    check_finite(**{f"tangents[{n!r}]": t for n, t in tangents.items()})
    return two_layer_jvp(x, dA=tangents.get("hidden.weight"), dc=tangents.get("hidden.bias"),
                         dB=tangents.get("output.weight"), **w)


def model_vjp(model: TwoLayer, x, cotangent) -> Dict[str, torch.Tensor]:
    """:func:`two_layer_vjp` → dict parameter name → gradient shaped like the parameter."""
    w = model_weights(model)
    gA, gc, gB = two_layer_vjp(x, cotangent, **w)
    out = {"hidden.weight": gA}
    if w["c"] is not None:
        out["hidden.bias"] = gc
    out["output.weight"] = gB
    return out


def model_ntk_vp(model: TwoLayer, x1, v, x2=None):
    """:func:`two_layer_ntk_vp` at the parameters of ``model``."""
    return two_layer_ntk_vp(x1, v, x2, **model_weights(model))
