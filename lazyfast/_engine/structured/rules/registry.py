"""The open registry of layer rules (docs/engine.md, "Custom rules").

A rule tells the structured engine how to form the per-example gradients of a module's parameters
from what one forward and one batched backward capture, as Opacus registers one grad-sampler per
layer type. The protocol:

* **What the engine captures**, for every call of a module of the registered type during the
  forward (its own ``forward``, bracketed like the built-in rules): ``u``, the call's first input
  with the batch first, (n, ...), and ``delta``, the cotangents of the call's output for all k
  outputs of the model, (k, n, *output.shape[1:]). A module called several times gives several
  ``(u, delta)`` pairs (weight sharing); the rule sums over them.
* **What the rule returns**: ``per_example_gradients(module, calls) -> [g_1, g_2]``, one tensor
  (k, n, *param.shape) per declared parameter (the gradient of output a of sample i with respect
  to the parameter). The engine flattens them to (n·k, P) blocks and contracts them with the other
  layers' (the "gradients" contraction order of docs/engine.md; a rule has that one order).
* **Its cost model**: ``flops(module, n, k) -> float``, the FLOPs of forming the per-example
  gradients of n samples (default: 2·n·k·P·(positions), counted from the captured shapes). Memory:
  the engine holds k·P numbers per sample for the rule, like a built-in rule in the gradients order.

The real call verifies a custom rule like a built-in one (calls, shapes, uses of its parameters
outside the module's own forward, aliases) and the self-check compares the kernel with autograd.
A rule covers one or two parameters of its module (``params``); a module with other trainable
parameters is left to the generic remainder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["Rule", "register_rule", "unregister_rule", "registered_rules", "rule_for", "find_rule"]


@dataclass(frozen=True)
class Rule:
    """One layer rule. Built-in rules (``builtin=True``) name the engine's own contraction for their
    ``kind`` (``"linear"``, ``"conv"``, ``"embedding"``, ``"norm"``: two contraction orders and their FLOP
    model, docs/engine.md) and an ``applies(module)`` test (unmodified forward, supported options);
    a custom rule (``kind="custom"``) brings its ``per_example_gradients`` and optional ``flops``."""
    module_type: type
    params: Tuple[str, ...]
    per_example_gradients: Optional[Callable]
    subclasses: bool = False
    flops: Optional[Callable] = None
    name: str = ""
    kind: str = "custom"
    applies: Optional[Callable] = None
    builtin: bool = False


_RULES: Dict[type, Rule] = {}  # custom rules, by module type (they take precedence over built-in ones)
_BUILTIN: List[Rule] = []  # the engine's rules, registered by .builtin at import, in order


def _register_builtin(module_type: type, kind: str, applies: Callable, params: Sequence[str] = ("weight", "bias"),
                      name: str = "") -> Rule:
    """The door the engine's own rules come through (:mod:`.builtin` registers them)."""
    rule = Rule(module_type, tuple(params), None, True, None, name or module_type.__name__, kind, applies, True)
    _BUILTIN.append(rule)
    return rule


def register_rule(module_type: type, *, params: Sequence[str], per_example_gradients: Callable,
                  subclasses: bool = False, flops: Optional[Callable] = None, name: str = "") -> Rule:
    """Registers a layer rule for ``module_type`` (replacing an earlier one for that type).

    Args:
        module_type: an ``nn.Module`` subclass; its instances with the class's own ``forward``
            (no instance-level override) take the rule; ``subclasses=True`` extends it to
            subclasses that keep that ``forward``.
        params: the names of the module's parameters the rule computes (one or two).
        per_example_gradients: ``fn(module, calls) -> list`` of (k, n, *param.shape) tensors,
            one per name in ``params``; ``calls`` is a list of ``(u, delta)`` (see the module doc).
        flops: ``fn(module, n, k) -> float``, optional cost model.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if isinstance(params, str) or not isinstance(params, (list, tuple)) or not 1 <= len(params) <= 2 or \
            not all(isinstance(p, str) and p for p in params) or len(set(params)) != len(params):
        raise ValueError(f"params must be a list of one or two distinct parameter names, got {params!r}")
    if not callable(per_example_gradients):
        raise TypeError("per_example_gradients must be callable: fn(module, calls) -> [per-example gradients]")
    if flops is not None and not callable(flops):
        raise TypeError("flops must be callable: fn(module, n, k) -> float, or None")
    if not isinstance(subclasses, bool):
        raise TypeError(f"subclasses must be a bool, got {type(subclasses).__name__}")
    rule = Rule(module_type, tuple(params), per_example_gradients, subclasses, flops, name or module_type.__name__)
    _RULES[module_type] = rule
    return rule


def unregister_rule(module_type: type) -> None:
    """Removes the rule of ``module_type`` (KeyError if there is none)."""
    del _RULES[module_type]


def registered_rules(builtin: bool = False) -> Dict[type, Rule]:
    """The registered custom rules, by module type; with ``builtin=True`` the engine's built-in rules
    too (a custom rule for the same type shadows the built-in one)."""
    if not builtin:
        return dict(_RULES)
    out = {r.module_type: r for r in _BUILTIN}
    out.update(_RULES)
    return out


def rule_for(m: nn.Module) -> Optional[Rule]:
    """The custom rule that applies to ``m`` (exact type, or a subclass when allowed), with the
    rule's class ``forward`` running unmodified; else None."""
    if not _RULES or "forward" in m.__dict__:
        return None
    rule = _RULES.get(type(m))
    if rule is None:
        for t, r in _RULES.items():
            if r.subclasses and isinstance(m, t) and type(m).forward is t.forward:
                return r
        return None
    return rule


def find_rule(m: nn.Module) -> Optional[Rule]:
    """The rule the engine uses for module ``m``: its custom rule (see :func:`rule_for`), else the first
    built-in rule whose type ``m`` is an instance of, if that rule ``applies`` to it; else None."""
    rule = rule_for(m)
    if rule is not None:
        return rule
    for r in _BUILTIN:
        if isinstance(m, r.module_type):
            return r if r.applies(m) else None
    return None


def _plain_forward(m: nn.Module, base) -> bool:
    """``m`` runs ``base``'s own forward: not overridden on its class or instance, not parametrized
    (the applies-check the built-in rules share)."""
    return (type(m).forward is base.forward and "forward" not in m.__dict__
            and not parametrize.is_parametrized(m))
