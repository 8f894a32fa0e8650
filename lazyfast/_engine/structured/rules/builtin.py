"""Which rule a module takes: the built-in module rules (registered on import), ``rule_kind``, what a layer covers.

The built-in rules come through the registry's door (:func:`.registry._register_builtin`) in matching
order; ``_wb`` gives the (weight, bias) a rule layer's module holds for its rule.
"""
from __future__ import annotations

from typing import Optional

from torch import nn
from torch.nn.utils import parametrize

from lazyfast._engine.structured.rules.attention import _InProj
from lazyfast._engine.structured.rules.embedding import _embedding_options_supported
from lazyfast._engine.structured.rules.linear import _LinearT
from lazyfast._engine.structured.rules.norm import _NORMS, _norm_applies
from lazyfast._engine.structured.rules.registry import _RULES, _plain_forward, _register_builtin, find_rule, rule_for
from lazyfast.models import _Dense


def _applies_to(base):
    """The applies-check of the Linear / Conv / Embedding rules: the ``base`` class's own forward, and an
    Embedding's options supported."""
    def applies(m: nn.Module) -> bool:
        if not _plain_forward(m, base):
            return False
        if isinstance(m, nn.Embedding) and not _embedding_options_supported(m):
            return False
        return True
    return applies


def _register_builtin_rules() -> None:
    """The engine's rules, through the registry's door (:mod:`.registry`), in matching order."""
    for base, kind in ((nn.Linear, "linear"), (_Dense, "linear"), (nn.Conv1d, "conv"), (nn.Conv2d, "conv"),
                       (nn.Conv3d, "conv"), (nn.Embedding, "embedding")):
        _register_builtin(base, kind, _applies_to(base), params=("weight",) if kind == "embedding" else
                          ("weight", "bias"))
    for base in _NORMS:
        _register_builtin(base, "norm", _norm_applies)


def rule_kind(m: nn.Module) -> Optional[str]:
    """'linear' | 'conv' | 'embedding' | 'norm' | 'custom' for a module with a rule, else None."""
    rule = find_rule(m)
    if rule is None:
        return None
    if rule.kind == "custom" and parametrize.is_parametrized(m):
        return None
    return rule.kind


def _wb(m):
    """(weight, bias) of a rule layer's module: the parameters its rule covers (None where absent)."""
    if isinstance(m, _InProj):
        return m.weight, m.bias
    if isinstance(m, _LinearT):
        return m.params
    rule = rule_for(m) if _RULES else None
    if rule is not None:
        ps = [m._parameters.get(n) for n in rule.params]
        return tuple(ps + [None] * (2 - len(ps)))
    return m._parameters.get("weight"), m._parameters.get("bias")


_register_builtin_rules()
