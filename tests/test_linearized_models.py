"""Linearized on the model families users bring (issue 20's failures): token ids, PyTorch's default
attention (scaled_dot_product_attention, whose fused CPU kernel has no forward-mode AD), and
hardsigmoid / hardswish (whose backward has no derivative, so the cached double-VJP cannot run).
Each: output = f(w0) + J(w0)(w − w0) to 1e-10 in float64, gradients = autograd's of that definition.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vjp

import lazyfast

D = torch.float64


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.o = nn.Embedding(20, 6), nn.Linear(6, 3)

    def forward(self, ids):
        return self.o(torch.tanh(self.e(ids)).mean(1))


class SDPA(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, 2)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.o(F.scaled_dot_product_attention(q, k, v).mean(1))


class Encoder(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True), 1)
        self.o = nn.Linear(d, 2)

    def forward(self, x):
        return self.o(self.enc(x).mean(1))


class Hard(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(F.hardswish(self.a(x)) * F.hardsigmoid(self.a(x)))


CASES = {
    "tokens": (Tokens, lambda: torch.randint(0, 20, (5, 4))),
    "sdpa": (SDPA, lambda: torch.randn(5, 4, 8, dtype=D)),
    "encoder": (Encoder, lambda: torch.randn(5, 4, 8, dtype=D)),
    "hard": (Hard, lambda: torch.randn(5, 3, dtype=D)),
}


def definition(model0, w, x):
    """f(w0, x) + J(w0, x)(w − w0) by torch.func on the math attention path (the definition)."""
    w0 = {n: p.detach() for n, p in model0.named_parameters()}
    dw = {n: w[n] - w0[n] for n in w0}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), lazyfast.structured.no_fastpath():
        f0, t = jvp(lambda p: functional_call(model0, p, (x,)), (w0,), (dw,))
    return f0 + t


def grad_definition(model0, x, r):
    """J(w0, x)ᵀ r by torch.func (math attention path)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    w0 = {n: p.detach() for n, p in model0.named_parameters()}
    with sdpa_kernel([SDPBackend.MATH]), lazyfast.structured.no_fastpath():
        _, fn = vjp(lambda p: functional_call(model0, p, (x,)), w0)
        (g,) = fn(r)
    return g


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", ("auto", "ntk", "cached"))
def test_linearized_matches_its_definition_over_steps(case, impl):
    torch.manual_seed(0)
    cls, xs = CASES[case]
    model = cls().double().eval()
    x = xs()
    lin = lazyfast.Linearized(model, implementation=impl)
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    model0 = cls().double().eval()
    model0.load_state_dict(model.state_dict())
    for step in range(3):  # the same batch: the cached path from the second step
        out = lin(x)
        w = {n: p for n, p in lin.model.named_parameters()}
        ref = definition(model0, w, x)
        assert (out - ref).abs().max() <= 1e-10 * max(1.0, ref.abs().max())
        loss = (out ** 2).sum()
        names = [n for n, _ in lin.model.named_parameters()]
        g = torch.autograd.grad(loss, [w[n] for n in names], retain_graph=True)
        g_ref = grad_definition(model0, x, 2 * ref.detach())  # the output is linear in w: Jᵀ(∂loss/∂out)
        for a, b in zip(g, [g_ref[n] for n in names]):
            assert (a - b).abs().max() <= 1e-9 * max(1.0, b.abs().max())
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("cls", (SDPA, Encoder))
def test_linearized_float32_default_attention(cls):
    """float32 on the CPU selects the fused SDPA kernel, which has no forward-mode AD: the tangent
    pass takes the math backend; the result matches the definition to float32 round-off."""
    torch.manual_seed(0)
    model = cls().float().eval()
    x = torch.randn(5, 4, 8)
    lin = lazyfast.Linearized(model, implementation="ntk")
    with torch.no_grad():
        for p in lin.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = lin(x)
    model0 = cls().float().eval()
    model0.load_state_dict(model.state_dict())
    ref = definition(model0, dict(lin.model.named_parameters()), x)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max())
