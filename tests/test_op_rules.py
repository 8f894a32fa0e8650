"""Operator rules (docs/engine.md, "Operator rules"): parameters that no module rule takes but that
the forward uses only as the weight / bias of a recognized op (F.layer_norm / group_norm /
batch_norm in eval, x·γ, x + β, addmm with an (in, out) weight, F.linear) take the structured path, whatever
module calls the op (timm-style LayerNorm2d, BatchNormAct, layer scale, Hugging Face Conv1D).
Exact against autograd through the real model, float64 ≤ 1e-10, trace and full, x2 given or not.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lazyfast
from lazyfast._engine import structured

from test_every_call import batch_oracle, rel

D = torch.float64


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: permute, F.layer_norm, permute back."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BatchNorm + activation in one module (its own forward)."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                   self.eps))


class ConvNeXtish(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.norm = LayerNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.bn = BatchNormAct2d(c)
        self.pw = nn.Linear(c, 2 * c)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 2 * c))
        self.gn_w = nn.Parameter(torch.rand(2 * c) + 0.5)
        self.gn_b = nn.Parameter(torch.randn(2 * c) * 0.1)
        self.head = nn.Linear(2 * c, 3)

    def forward(self, x):
        h = self.norm(self.stem(x))
        h = self.bn(self.dw(h))
        h = self.pw(h.permute(0, 2, 3, 1)) * self.gamma  # layer scale, channels last
        h = F.group_norm(h.permute(0, 3, 1, 2), 3, self.gn_w, self.gn_b, 1e-5)
        return self.head(torch.tanh(h).mean((2, 3)))


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: addmm with an (in, out) weight on the flattened rows."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPTish(nn.Module):
    def __init__(self, d=4, L=5):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, L, d) * 0.1)  # x + pos: a shift rule
        self.c_fc = Conv1D(2 * d, d)
        self.c_proj = Conv1D(d, 2 * d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = x + self.pos
        h = h + self.c_proj(F.gelu(self.c_fc(h)))
        return self.head(self.ln(h)[:, -1])


class ScaleTwice(nn.Module):
    """One γ used by two multiplications (weight sharing of an operator rule)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.g = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        h = torch.tanh(self.a(x) * self.g)
        return self.b(h * self.g)


class ScaleAlsoElsewhere(nn.Module):
    """γ used by a recognized op and by another one: no operator rule (the remainder), still exact."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.g = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x) * self.g) + self.g.exp())


class TimmLinear(nn.Linear):
    """timm's ``Linear``: an nn.Linear subclass with its own forward calling F.linear (the module rule
    refuses an overridden forward; the ``linear`` operator rule takes it)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class FunctionalHead(nn.Module):
    """Raw parameters through F.linear on a rank-3 input (no bias on the second), keyword arguments."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4) * 0.5)
        self.b1 = nn.Parameter(torch.randn(6) * 0.1)
        self.w2 = nn.Parameter(torch.randn(2, 6) * 0.5)
        self.fc = TimmLinear(2, 3)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w1, self.b1))
        return self.fc(F.linear(input=h, weight=self.w2).mean(1))


def _init_bn(m):
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m


CASES = {
    "convnextish": (lambda: _init_bn(ConvNeXtish()).double().eval(), lambda n, s: torch.randn(
        n, 3, 8, 8, dtype=D, generator=torch.Generator().manual_seed(s))),
    "gptish": (lambda: GPTish().double(), lambda n, s: torch.randn(n, 5, 4, dtype=D,
                                                                     generator=torch.Generator().manual_seed(s))),
    "scale_twice": (lambda: ScaleTwice().double(), lambda n, s: torch.randn(n, 3, dtype=D,
                                                                             generator=torch.Generator().manual_seed(s))),
    "functional_linear": (lambda: FunctionalHead().double(), lambda n, s: torch.randn(
        n, 5, 4, dtype=D, generator=torch.Generator().manual_seed(s))),
    "scale_elsewhere": (lambda: ScaleAlsoElsewhere().double(), lambda n, s: torch.randn(
        n, 3, dtype=D, generator=torch.Generator().manual_seed(s))),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ("trace", "full"))
@pytest.mark.parametrize("same", (True, False))
def test_operator_rules_exact(case, mode, same):
    torch.manual_seed(0)
    mk, xs = CASES[case]
    m = mk()
    x1 = xs(5, 1)
    x2 = None if same else xs(3, 2)
    K = structured.structured_ntk(m, x1, x2, mode=mode, chunk_size=2)
    if same:
        ref = batch_oracle(m, x1, mode)
    else:
        ref = batch_oracle(m, torch.cat([x1, x2]), mode)[:5, 5:]
    assert rel(K, ref) < 1e-10


@pytest.mark.parametrize("case,expected", (("convnextish", 1.0), ("gptish", 1.0), ("scale_twice", 1.0),
                                            ("functional_linear", 1.0)))
def test_operator_rules_take_the_parameters(case, expected):
    torch.manual_seed(0)
    mk, xs = CASES[case]
    m = mk()
    e = lazyfast.explain(m, xs(4, 1))
    assert e.rule_fraction == expected, str(e)
    assert e.implementation == "structured"


def test_parameter_also_used_elsewhere_stays_in_the_remainder():
    torch.manual_seed(0)
    m = ScaleAlsoElsewhere().double()
    e = lazyfast.explain(m, torch.randn(4, 3, dtype=D))
    g = next(p for p in e.parameters if p["name"] == "g")
    assert g["path"] == "remainder" and "used elsewhere" in g["reason"]


def test_operator_rule_float32_close_to_float64():
    torch.manual_seed(0)
    mk, xs = CASES["convnextish"]
    m64 = mk()
    x = xs(6, 3)
    K64 = lazyfast.empirical_ntk(m64, x)
    m32 = mk().float()
    m32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in m64.state_dict().items()})
    K32 = lazyfast.empirical_ntk(m32, x.float())
    assert rel(K32.double(), K64) < 1e-5


def test_linear_operator_rule_on_the_real_call_with_a_hook_and_an_alias():
    """The F.linear site is confirmed on the real call: a forward hook that rescales a layer's output is
    seen (the kernel stays the real module's); the same Parameter reached through a list is the
    parameter (exact, still on the rule); a view made before the forward is refused with a clear
    error; the module's state is unchanged."""
    torch.manual_seed(0)
    m = FunctionalHead().double()
    x = torch.randn(5, 5, 4, dtype=D)
    h = m.fc.register_forward_hook(lambda mod, inp, out: 3.0 * out)
    try:
        before = {k: v.clone() for k, v in m.state_dict().items()}
        K = lazyfast.empirical_ntk(m, x, mode="full", implementation="structured", check=False)
        assert rel(K, batch_oracle(m, x, "full")) < 1e-10
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    finally:
        h.remove()

    class ThroughList(FunctionalHead):
        def forward(self, x):
            h = torch.tanh(F.linear(x, self.ws[0], self.b1))
            return self.fc(F.linear(input=h, weight=self.w2).mean(1))

    m = ThroughList().double()
    m.ws = [m.w1]
    assert lazyfast.explain(m, x).rule_fraction == 1.0
    K = lazyfast.empirical_ntk(m, x, mode="full", implementation="structured", check=False)
    assert rel(K, batch_oracle(m, x, "full")) < 1e-10

    class ViewAlias(FunctionalHead):
        def forward(self, x):
            h = torch.tanh(F.linear(x, self.wT.T, self.b1))
            return self.fc(F.linear(input=h, weight=self.w2).mean(1))

    m = ViewAlias().double()
    m.wT = m.w1.T  # a view made before the forward
    with pytest.raises(ValueError, match="'w1' is used in the forward through an alias"):
        lazyfast.empirical_ntk(m, x, implementation="structured", check=False)


class ClsToken(nn.Module):
    """A ViT-style class token: a (1, 1, d) parameter expanded over the batch and concatenated to the
    patch tokens (as timm and Hugging Face ViTs write it), then a position shift."""

    def __init__(self, use="expand", d=4, L=3):
        super().__init__()
        self.use = use
        self.proj = nn.Linear(2, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, L + 1, d) * 0.1)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)
        self.switch = types.SimpleNamespace(on=False)  # not a plain attribute: outside the plan's fingerprint

    def forward(self, x):  # x (n, L, 2)
        h = self.proj(x)
        n = h.shape[0]
        if self.use == "expand":
            c = self.cls.expand(n, -1, -1)
        elif self.use == "expand_as":
            c = self.cls.expand_as(h[:, :1])
        elif self.use == "broadcast_to":
            c = torch.broadcast_to(self.cls, (n, 1, h.shape[2]))
        elif self.use == "to":  # a copy and a dtype no-op before the concatenation
            c = self.cls.expand(n, -1, -1).to(h.dtype).contiguous()
        elif self.use == "mean":  # reduces the expansion over the batch axis: not batch-wise
            c = self.cls.expand(n, -1, -1).mean(0, keepdim=True).expand(n, -1, -1)
        elif self.use == "late_mean":  # batch-wise until the switch is on
            c = self.cls.expand(n, -1, -1)
            if self.switch.on:
                c = (c * 2.0).sum(0, keepdim=True).expand(n, -1, -1) / n
        h = self.ln(torch.cat([c, h], dim=1) + self.pos)
        h = h * torch.tanh(h.mean(1, keepdim=True))  # the tokens interact (as attention makes them)
        return self.head(torch.tanh(h).mean(1))


def _cls_x(n, s):
    return torch.randn(n, 3, 2, dtype=D, generator=torch.Generator().manual_seed(s))


@pytest.mark.parametrize("use", ["expand", "expand_as", "broadcast_to", "to"])
@pytest.mark.parametrize("mode", ("trace", "full"))
def test_class_token_on_the_broadcast_rule_and_exact(use, mode):
    torch.manual_seed(0)
    m = ClsToken(use).double()
    e = lazyfast.explain(m, _cls_x(4, 1))
    assert e.rule_fraction == 1.0, str(e)
    assert "broadcast" in next(p for p in e.parameters if p["name"] == "cls")["reason"] + str(e)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x1, x2 = _cls_x(5, 1), _cls_x(3, 2)
    assert rel(lazyfast.empirical_ntk(m, x1, mode=mode, implementation="structured"), batch_oracle(m, x1, mode)) < 1e-10
    K12 = lazyfast.empirical_ntk(m, x1, x2, mode=mode, implementation="structured")
    assert rel(K12, batch_oracle(m, torch.cat([x1, x2]), mode)[:5, 5:]) < 1e-10
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_class_token_float32_close_to_float64():
    torch.manual_seed(0)
    m64 = ClsToken().double()
    x = _cls_x(6, 3)
    K64 = lazyfast.empirical_ntk(m64, x)
    m32 = ClsToken().float()
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    assert rel(lazyfast.empirical_ntk(m32, x.float()).double(), K64) < 1e-5


def test_class_token_expansion_reduced_over_the_batch_goes_to_remainder():
    """Taking only sample i's row of the expansion would give 1/n of its gradient here."""
    torch.manual_seed(0)
    m = ClsToken("mean").double()
    e = lazyfast.explain(m, _cls_x(4, 1))
    p = next(p for p in e.parameters if p["name"] == "cls")
    assert p["path"] == "remainder" and "batch-wise" in p["reason"]
    x = _cls_x(5, 1)
    assert rel(lazyfast.empirical_ntk(m, x, mode="full", implementation="structured"), batch_oracle(m, x, "full")) < 1e-10


def test_class_token_misused_only_on_a_later_call_is_caught():
    """The plan is cached with the rule; a later call reduces the expansion over the batch (and scales it,
    so the consumer is watched through the product): the capture's check moves the parameter to the
    remainder before any cotangent is used, on that call and the next (the randomized self-check is off:
    the plan's own check is under test)."""
    torch.manual_seed(0)
    m = ClsToken("late_mean").double()
    x = _cls_x(5, 1)
    K0 = lazyfast.empirical_ntk(m, x, mode="full", implementation="structured", check=False)
    assert rel(K0, batch_oracle(m, x, "full")) < 1e-10
    m.switch.on = True
    R = batch_oracle(m, x, "full")
    assert rel(R, K0) > 1e-3
    for _ in range(2):
        assert rel(lazyfast.empirical_ntk(m, x, mode="full", implementation="structured", check=False), R) < 1e-10


class LayerScaleViews(nn.Module):
    """Layer scale through a view made in the forward, as timm's ConvNeXt block writes it
    (``x.mul(gamma.reshape(1, -1, 1, 1))``), and the other order-keeping spellings."""

    def __init__(self, use="reshape", c=3):
        super().__init__()
        self.use = use
        self.conv = nn.Conv2d(2, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, c))
        self.beta = nn.Parameter(torch.randn(c) * 0.1)
        self.head = nn.Linear(c, 2)
        self.switch = types.SimpleNamespace(on=False)  # not a plain attribute: outside the plan's fingerprint

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        g, b = self.gamma, self.beta
        if self.use == "reshape":
            h = h.mul(g.reshape(1, -1, 1, 1)) + b.view(1, -1, 1, 1)
        elif self.use == "index":
            h = h * g[:, None, None] + b[..., None, None]
        elif self.use == "unsqueeze":  # a view of a view
            h = h * g.unsqueeze(-1).unsqueeze(-1) + b.reshape(-1, 1).unsqueeze(-1)
        elif self.use == "reorder":  # an index that permutes γ's numbers: not a view of γ in its order
            h = h * g[torch.arange(g.numel() - 1, -1, -1)][:, None, None] + b[:, None, None]
        elif self.use == "elsewhere":  # the view also feeds another op
            v = g.reshape(1, -1, 1, 1)
            h = h * v + v.exp() + b[:, None, None]
        elif self.use == "late_shape":  # γ along the last axis once the switch is on (same shapes: 3×3×3)
            if self.switch.on:
                h = h * g.reshape(1, 1, 1, -1) + b[:, None, None]
            else:
                h = h * g.reshape(1, -1, 1, 1) + b[:, None, None]
        return self.head(torch.tanh(h).mean((2, 3)))


def _ls_x(n, s):
    return torch.randn(n, 2, 4, 4, dtype=D, generator=torch.Generator().manual_seed(s))


@pytest.mark.parametrize("use,on_rules", [("reshape", True), ("index", True), ("unsqueeze", True),
                                          ("reorder", False), ("elsewhere", False)])
def test_layer_scale_through_a_view_made_in_the_forward(use, on_rules):
    torch.manual_seed(0)
    m = LayerScaleViews(use).double()
    e = lazyfast.explain(m, _ls_x(4, 1))
    g = next(p for p in e.parameters if p["name"] == "gamma")
    assert (g["path"] == "rule") == on_rules, str(e)
    if on_rules:
        assert e.rule_fraction == 1.0, str(e)
    x1, x2 = _ls_x(5, 1), _ls_x(3, 2)
    for mode in ("trace", "full"):
        K = lazyfast.empirical_ntk(m, x1, mode=mode, implementation="structured")
        assert rel(K, batch_oracle(m, x1, mode)) < 1e-10
        K12 = lazyfast.empirical_ntk(m, x1, x2, mode=mode, implementation="structured")
        assert rel(K12, batch_oracle(m, torch.cat([x1, x2]), mode)[:5, 5:]) < 1e-10


def test_layer_scale_view_of_another_shape_on_a_later_call_is_caught():
    """Same shapes, γ broadcast along another axis on a later call: the capture sees the view's shape
    differ from the plan's and moves γ to the remainder (the self-check off: the plan's check under test)."""
    torch.manual_seed(0)
    m = LayerScaleViews("late_shape").double()
    x = torch.randn(5, 2, 3, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    assert rel(lazyfast.empirical_ntk(m, x, mode="full", implementation="structured", check=False), batch_oracle(m, x, "full")) < 1e-10
    K0 = lazyfast.empirical_ntk(m, x, mode="full", implementation="structured", check=False)
    m.switch.on = True
    R = batch_oracle(m, x, "full")
    assert rel(R, K0) > 1e-3
    for _ in range(2):
        assert rel(lazyfast.empirical_ntk(m, x, mode="full", implementation="structured", check=False), R) < 1e-10
