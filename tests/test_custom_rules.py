"""The open rule registry (lazyfast/rules.py, docs/engine.md "Custom rules"): a user-defined rule for
a custom layer is used (explain says so) and exact; a wrong rule is caught by the self-check; bad
registrations are clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lazyfast
from lazyfast import selfcheck

from test_every_call import batch_oracle, rel

D = torch.float64


class LowRank(nn.Module):
    """y = (x U) V: a custom layer no built-in rule knows."""

    def __init__(self, d, r, o):
        super().__init__()
        self.U = nn.Parameter(torch.randn(d, r) / d ** 0.5)
        self.V = nn.Parameter(torch.randn(r, o) / r ** 0.5)

    def forward(self, x):
        return (x @ self.U) @ self.V


def lowrank_grads(m, calls):
    """dU = Σ_p xᵀ(δ Vᵀ), dV = Σ_p (x U)ᵀ δ, per sample and output; calls: [(u (n, ..., d), δ (k, n, ..., o))]."""
    gU = gV = 0
    for u, d in calls:
        k, n = d.shape[:2]
        u2 = u.reshape(n, -1, u.shape[-1])
        d2 = d.reshape(k, n, -1, d.shape[-1])
        gU = gU + torch.einsum("npd,knpo,ro->kndr", u2, d2, m.V)
        gV = gV + torch.einsum("npd,dr,knpo->knro", u2, m.U, d2)
    return [gU, gV]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.low = LowRank(6, 2, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.low(h)) + 0.5 * self.low(h)  # called twice (weight sharing)
        return self.head(h)


@pytest.fixture
def lowrank_rule():
    lazyfast.register_rule(LowRank, params=("U", "V"), per_example_gradients=lowrank_grads)
    yield
    lazyfast.unregister_rule(LowRank)


@pytest.mark.parametrize("mode", ("trace", "full"))
@pytest.mark.parametrize("same", (True, False))
def test_custom_rule_is_used_and_exact(lowrank_rule, mode, same):
    torch.manual_seed(0)
    m = Net().double()
    x1 = torch.randn(5, 4, dtype=D)
    x2 = None if same else torch.randn(3, 4, dtype=D)
    e = lazyfast.explain(m, x1)
    assert {p["name"]: p["path"] for p in e.parameters}["low.U"] == "rule"
    assert e.rule_fraction == 1.0 and e.implementation == "structured"
    K = lazyfast.empirical_ntk(m, x1, x2, mode=mode, check=True)
    ref = batch_oracle(m, x1, mode) if same else batch_oracle(m, torch.cat([x1, x2]), mode)[:5, 5:]
    assert rel(K, ref) < 1e-10


def test_without_the_rule_the_layer_is_remainder():
    torch.manual_seed(0)
    m = Net().double()
    e = lazyfast.explain(m, torch.randn(4, 4, dtype=D))
    assert {p["name"]: p["path"] for p in e.parameters}["low.U"] == "remainder"


def test_a_wrong_rule_is_caught_by_the_self_check():
    torch.manual_seed(0)
    lazyfast.register_rule(LowRank, params=("U", "V"),
                           per_example_gradients=lambda m, calls: [1.1 * g for g in lowrank_grads(m, calls)])
    try:
        m = Net().double()
        with pytest.raises(selfcheck.SelfCheckError):
            lazyfast.empirical_ntk(m, torch.randn(5, 4, dtype=D), implementation="structured", check=True)
    finally:
        lazyfast.unregister_rule(LowRank)


def test_a_rule_returning_the_wrong_shape_is_a_clear_error():
    lazyfast.register_rule(LowRank, params=("U", "V"), per_example_gradients=lambda m, calls: [m.U, m.V])
    try:
        with pytest.raises(ValueError, match=r"the rule for LowRank returned for 'U'"):
            lazyfast.empirical_ntk(Net().double(), torch.randn(5, 4, dtype=D), implementation="structured")
    finally:
        lazyfast.unregister_rule(LowRank)


@pytest.mark.parametrize("kwargs,exc", (
    (dict(module_type=int, params=("U",), per_example_gradients=lowrank_grads), TypeError),
    (dict(module_type=LowRank, params="U", per_example_gradients=lowrank_grads), ValueError),
    (dict(module_type=LowRank, params=("U", "V", "W"), per_example_gradients=lowrank_grads), ValueError),
    (dict(module_type=LowRank, params=("U",), per_example_gradients=3), TypeError),
    (dict(module_type=LowRank, params=("U",), per_example_gradients=lowrank_grads, subclasses="yes"), TypeError),
))
def test_bad_registrations(kwargs, exc):
    with pytest.raises(exc):
        lazyfast.register_rule(kwargs.pop("module_type"), **kwargs)


def test_builtin_rules_come_through_the_same_registry():
    """The engine's own rules are registry entries (kind, applicability test); a custom rule for a
    type shadows the built-in one, and unregistering it restores the built-in."""
    from torch import nn

    from lazyfast._engine.structured import rules
    from lazyfast._engine import structured

    table = lazyfast.registered_rules(builtin=True)
    assert table[nn.Linear].builtin and table[nn.Linear].kind == "linear"
    assert table[nn.Conv2d].kind == "conv" and table[nn.Embedding].kind == "embedding"
    assert table[nn.LayerNorm].kind == "norm"
    assert nn.Linear not in lazyfast.registered_rules()  # the default view: custom rules only
    lin = nn.Linear(3, 2)
    assert rules.find_rule(lin) is table[nn.Linear] and structured.rule_kind(lin) == "linear"
    bn = nn.BatchNorm1d(3)
    assert structured.rule_kind(bn) is None  # training mode: the built-in rule does not apply
    assert structured.rule_kind(bn.eval()) == "norm"

    def per_example(module, calls):
        raise AssertionError("not called here")

    lazyfast.register_rule(nn.Linear, params=("weight",), per_example_gradients=per_example)
    try:
        assert structured.rule_kind(lin) == "custom" and lazyfast.registered_rules(builtin=True)[nn.Linear].kind == "custom"
    finally:
        lazyfast.unregister_rule(nn.Linear)
    assert structured.rule_kind(lin) == "linear"
