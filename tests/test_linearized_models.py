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


class GluConvBN(nn.Module):
    """conv + BatchNorm (eval, non-trivial running statistics) + GLU + max-pool: the other op whose
    forward-mode formula has no derivative (aten::glu_jvp)."""

    def __init__(self):
        super().__init__()
        self.c, self.bn, self.o = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(4 * 4 * 4, 3)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = F.max_pool2d(F.glu(self.bn(self.c(x)), 1), 2)
        return self.o(h.flatten(1))


class FirstLayers(nn.Module):
    """Linear and convolutional layers on inputs without a tangent (the network's input, a buffer),
    called positionally and by keyword, with reflect padding and without a bias: the dual pass
    computes their tangent as ΔW·x alone (lazy._tangent_free_input)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect", bias=False)
        self.c1 = nn.Conv1d(2, 3, 2)
        self.l = nn.Linear(16, 5)
        self.o = nn.Linear(4 * 4 * 4 + 3 * 7 + 5, 3)
        self.register_buffer("const", torch.randn(1, 16))

    def forward(self, x):
        a = torch.tanh(self.c(x)).flatten(1)
        b = F.conv1d(input=x.flatten(2)[:, :, :8], weight=self.c1.weight, bias=self.c1.bias)
        c = F.linear(self.const, weight=self.l.weight, bias=self.l.bias).expand(x.shape[0], -1)
        return self.o(torch.cat([a, torch.sin(b).flatten(1), c], 1))


class ConvTangents(nn.Module):
    """Convolutions on inputs that carry a tangent (every one after the first): stride, dilation,
    groups, 1-d and 3-d, keyword arguments and a 'same' padding, beside the first layer's split
    (lazy._tangent_free_input)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2)
        self.c = nn.Conv2d(4, 4, 3, padding="same", bias=False)
        self.d = nn.Conv1d(4, 3, 2, stride=2)
        self.e = nn.Conv3d(1, 2, (1, 2, 2))
        self.f = nn.Conv2d(4, 4, 1)
        self.o = nn.Linear(3 * 4 + 2 * 4 * 2 * 2 + 4 * 3 * 3, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))                                      # (n, 4, 5, 5)
        h = torch.tanh(self.b(h))                                      # (n, 4, 3, 3)
        h = self.f(torch.tanh(self.c(h)))                              # (n, 4, 3, 3)
        u = F.conv1d(h.flatten(2), weight=self.d.weight, bias=self.d.bias, stride=2)   # (n, 3, 4)
        v = self.e(h.unsqueeze(1))                                     # (n, 2, 4, 2, 2)
        return self.o(torch.cat([u.flatten(1), torch.sin(v).flatten(1), h.flatten(1)], 1))


CASES = {
    "conv_tangents": (ConvTangents, lambda: torch.randn(5, 2, 5, 5, dtype=D)),
    "first_layers": (FirstLayers, lambda: torch.randn(5, 2, 4, 4, dtype=D)),
    "tokens": (Tokens, lambda: torch.randint(0, 20, (5, 4))),
    "glu_conv_bn": (GluConvBN, lambda: torch.randn(5, 2, 8, 8, dtype=D)),
    "sdpa": (SDPA, lambda: torch.randn(5, 4, 8, dtype=D)),
    "encoder": (Encoder, lambda: torch.randn(5, 4, 8, dtype=D)),
    "hard": (Hard, lambda: torch.randn(5, 3, dtype=D)),
}


def definition(model0, w, x):
    """f(w0, x) + J(w0, x)(w − w0) by torch.func on the math attention path (the definition)."""
    w0 = {n: p.detach() for n, p in model0.named_parameters()}
    dw = {n: w[n] - w0[n] for n in w0}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]), lazyfast._engine.structured.no_fastpath():
        f0, t = jvp(lambda p: functional_call(model0, p, (x,)), (w0,), (dw,))
    return f0 + t


def grad_definition(model0, x, r):
    """J(w0, x)ᵀ r by torch.func (math attention path)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    w0 = {n: p.detach() for n, p in model0.named_parameters()}
    with sdpa_kernel([SDPBackend.MATH]), lazyfast._engine.structured.no_fastpath():
        _, fn = vjp(lambda p: functional_call(model0, p, (x,)), w0)
        (g,) = fn(r)
    return g


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("impl", ("auto", "dual", "products", "cached"))
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
    lin = lazyfast.Linearized(model, implementation="products")
    with torch.no_grad():
        for p in lin.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = lin(x)
    model0 = cls().float().eval()
    model0.load_state_dict(model.state_dict())
    ref = definition(model0, dict(lin.model.named_parameters()), x)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max())


def oracle(model0, w, x, functional=False):
    """Independent of forward mode: J(w0, x) by reverse mode (jacrev, one row per output; with
    ``functional``, torch.autograd.functional.jacobian, for models torch.func cannot run), then
    f(w0) + J·Δw and the gradient Jᵀ·2(f(w0) + J·Δw) of the sum of squares."""
    from torch.func import jacrev
    from torch.nn.attention import SDPBackend, sdpa_kernel

    w0 = {n: p.detach() for n, p in model0.named_parameters()}
    names = list(w0)
    with sdpa_kernel([SDPBackend.MATH]), lazyfast._engine.structured.no_fastpath():
        if functional:
            Js = torch.autograd.functional.jacobian(lambda *ps: functional_call(model0, dict(zip(names, ps)), (x,)),
                                                    tuple(w0[n] for n in names))
            J = dict(zip(names, Js))
        else:
            J = jacrev(lambda p: functional_call(model0, p, (x,)))(w0)
        f0 = functional_call(model0, w0, (x,))
    Jm = torch.cat([J[n].reshape(f0.numel(), -1) for n in names], 1)
    dw = torch.cat([(w[n] - w0[n]).detach().reshape(-1) for n in names])
    out = f0 + (Jm @ dw).reshape(f0.shape)
    g = torch.split(Jm.T @ (2 * out).reshape(-1), [w0[n].numel() for n in names])
    return out, dict(zip(names, (gi.reshape(w0[n].shape) for gi, n in zip(g, names))))


@pytest.mark.parametrize("case", sorted(CASES))
def test_dual_path_new_batch_every_step_matches_reverse_mode_oracle(case):
    """Mini-batch SGD (a new batch each step): auto takes the dual pass, exact against a reverse-mode
    oracle (no forward-mode AD in it), for 3 steps."""
    torch.manual_seed(0)
    cls, xs = CASES[case]
    model = cls().double().eval()
    lin = lazyfast.Linearized(model)
    model0 = copy_of(cls, model)
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    dual = _count_dual_passes(lin)
    for step in range(3):
        x = xs()
        out = lin(x)
        assert dual == [step + 1]  # this call took the dual pass (not the cached path, not the JVP)
        w = dict(lin.model.named_parameters())
        ref, g_ref = oracle(model0, w, x)
        assert (out - ref).abs().max() <= 1e-10 * max(1.0, ref.abs().max())
        loss = (out ** 2).sum()
        g = torch.autograd.grad(loss, list(w.values()), retain_graph=True)
        scale = max(1.0, max(float(b.abs().max()) for b in g_ref.values()))
        for n, a in zip(w, g):
            assert (a - g_ref[n]).abs().max() <= 1e-9 * scale, n
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert lin._dual_ok


def _count_dual_passes(lin):
    """[number of dual passes run by ``lin`` so far], kept up to date. (Asking ``lin._linearization``
    before the call would not do: looking the batch up registers it, and the call then counts as a
    repeat and takes the cached path.)"""
    count = [0]
    run = lin._dual_pass

    def counted(x, params):
        count[0] += 1
        return run(x, params)

    lin._dual_pass = counted
    return count


def copy_of(cls, model):
    m = cls().double().eval()
    m.load_state_dict(model.state_dict())
    return m


class NoForwardAD(torch.autograd.Function):
    """x ↦ x³ with a backward but no forward-mode formula (no jvp)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


class Cube(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(NoForwardAD.apply(self.a(x)))


class OldStyleCube(torch.autograd.Function):
    """x ↦ x³ as an autograd.Function of the older form (ctx in forward, no setup_context) with a
    jvp: forward mode can run it, torch.func's transforms cannot."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.x = x
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g

    @staticmethod
    def jvp(ctx, t):
        return 3 * ctx.x ** 2 * t


class OldCube(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(OldStyleCube.apply(self.a(x)))


def test_an_autograd_function_torch_func_cannot_transform_takes_the_forward_ad_dual_pass():
    """The dual pass runs under torch.func.jvp (less memory held); an autograd.Function of the
    older form (no setup_context) makes it fall back to forward_ad's dual numbers directly, still
    one dual pass, still exact, for that call and every later one."""
    torch.manual_seed(0)
    model = OldCube().double()
    lin = lazyfast.Linearized(model)
    model0 = copy_of(OldCube, model)
    dual = _count_dual_passes(lin)
    for step in range(2):
        with torch.no_grad():
            for p in lin.model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(4, 3, dtype=D)
        out = lin(x)
        assert dual == [step + 1] and lin._dual_ok and not lin._functorch_ok
        w = dict(lin.model.named_parameters())
        ref, g_ref = oracle(model0, w, x, functional=True)  # torch.func cannot run the model
        assert (out - ref).abs().max() <= 1e-10 * max(1.0, ref.abs().max())
        g = torch.autograd.grad((out ** 2).sum(), list(w.values()))
        for n, a in zip(w, g):
            assert (a - g_ref[n]).abs().max() <= 1e-9 * max(1.0, g_ref[n].abs().max()), n


def test_op_without_forward_mode_falls_back_exactly():
    """The dual pass meets an op without a forward-mode formula: that call takes the double-VJP
    (reverse mode only), exactly, and the model the non-dual paths from then on."""
    torch.manual_seed(0)
    model = Cube().double()
    lin = lazyfast.Linearized(model)
    model0 = copy_of(Cube, model)
    with torch.no_grad():
        for p in lin.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(4, 3, dtype=D)
    out = lin(x)
    assert not lin._dual_ok
    w = dict(lin.model.named_parameters())
    # the oracle by hand (reverse mode, double-VJP-free): J from autograd.functional.jacobian
    w0 = {n: p.detach() for n, p in model0.named_parameters()}
    names = list(w0)

    def f(*ps):
        return functional_call(model0, dict(zip(names, ps)), (x,))

    J = torch.autograd.functional.jacobian(f, tuple(w0[n] for n in names))
    f0 = f(*(w0[n] for n in names))
    ref = f0 + sum((J[i].reshape(f0.numel(), -1) @ (w[n] - w0[n]).detach().reshape(-1)).reshape(f0.shape)
                   for i, n in enumerate(names))
    assert (out - ref).abs().max() <= 1e-10 * max(1.0, ref.abs().max())
    g = torch.autograd.grad((out ** 2).sum(), list(w.values()))
    for i, (n, a) in enumerate(zip(names, g)):
        b = (J[i].reshape(f0.numel(), -1).T @ (2 * ref).reshape(-1)).reshape(a.shape)
        assert (a - b).abs().max() <= 1e-9 * max(1.0, b.abs().max())
    x2 = torch.randn(4, 3, dtype=D)  # a new batch: the double-VJP for this call, still exact
    assert isinstance(lin._linearization(lin._entry(x2, primal=False), x2), lazyfast.lazy._CachedLinearization)
    out2 = lin(x2)
    f02 = functional_call(model0, w0, (x2,))
    J2 = torch.autograd.functional.jacobian(lambda *ps: functional_call(model0, dict(zip(names, ps)), (x2,)),
                                            tuple(w0[n] for n in names))
    ref2 = f02 + sum((J2[i].reshape(f02.numel(), -1) @ (w[n] - w0[n]).detach().reshape(-1)).reshape(f02.shape)
                     for i, n in enumerate(names))
    assert (out2 - ref2).abs().max() <= 1e-10 * max(1.0, ref2.abs().max())


def test_dual_under_no_grad_and_inference_mode():
    torch.manual_seed(0)
    model = Hard().double()
    lin = lazyfast.Linearized(model, implementation="dual")
    with torch.no_grad():
        for p in lin.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(4, 3, dtype=D)
    ref = lin(x).detach()
    with torch.no_grad():
        a = lin(x)
    with torch.inference_mode():
        b = lin(x.clone())
    assert not a.requires_grad and (a - ref).abs().max() <= 1e-12
    assert (b - ref).abs().max() <= 1e-12


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        return {"logits": self.a(x), "aux": x.sum()}


def test_linearized_output_fn_selects_a_dict_output():
    torch.manual_seed(0)
    model = TupleOut().double()
    lin = lazyfast.Linearized(model, output_fn="logits")
    x = torch.randn(4, 3, dtype=D)
    assert torch.allclose(lin(x), model(x)["logits"])
    with pytest.raises(TypeError, match="output_fn"):
        lazyfast.Linearized(model)(x)


ZOO = ["timm_resnet10t", "timm_efficientnet_b0", "timm_mobilenetv3", "timm_vit_tiny", "hf_bert", "hf_vit", "hf_gpt2"]


@pytest.mark.parametrize("name", ZOO)
def test_linearized_on_timm_and_hugging_face_models(name):
    """The issue's model families (random init, eval; attention by SDPA), float64: the dual pass equals
    f(w0) + J(w0)Δw from a reverse-mode oracle, and its gradients Jᵀ(∂loss/∂out)."""
    from lazyfast import zoo

    try:
        zoo.import_timm() if name.startswith("timm") else zoo.import_transformers()
    except ImportError:
        pytest.skip("timm / transformers not installed (optional bench dependencies)")
    model = zoo.build(name, dtype=D)
    x = zoo.inputs(name, 2, dtype=D)
    lin = lazyfast.Linearized(model)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in lin.model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    out = lin(x)
    w = dict(lin.model.named_parameters())
    ref, g_ref = oracle(lin.model0, w, x)
    assert (out - ref).abs().max() <= 1e-10 * max(1.0, ref.abs().max())
    g = torch.autograd.grad((out ** 2).sum(), list(w.values()))
    scale = max(float(b.abs().max()) for b in g_ref.values())
    for n, a in zip(w, g):
        assert (a - g_ref[n]).abs().max() <= 1e-9 * scale, n
    assert lin._dual_ok


def test_linearized_of_a_compiled_module_is_the_module_s_linearization():
    """torch.compile(model) is unwrapped to the module it compiles (same parameters, same function)."""
    torch.manual_seed(0)
    model = Hard().double()
    lin_c = lazyfast.Linearized(torch.compile(model))
    lin = lazyfast.Linearized(model)
    x = torch.randn(4, 3, dtype=D)
    for a, b in zip(lin_c.model.parameters(), lin.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(lin_c(x), lin(x))


class ListAlias(nn.Module):
    """A parameter reached through a list made before the call (substitution by name misses it)."""

    def __init__(self):
        super().__init__()
        self.fc, self.o = nn.Linear(3, 3), nn.Linear(3, 2)
        self.ws = [self.fc.weight]

    def forward(self, x):
        return self.o(torch.tanh(self.fc(x) + x @ self.ws[0].T))


@pytest.mark.parametrize("impl", ("auto", "dual", "cached", "products"))
def test_linearized_refuses_a_parameter_alias_on_every_path(impl):
    lin = lazyfast.Linearized(ListAlias().double(), implementation=impl)
    x = torch.randn(4, 3, dtype=D)
    with pytest.raises(ValueError, match="alias"):
        out = lin(x)
        lin(x)  # the cached path builds its linearization on the second call
        out.sum().backward()


def _mlp():
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 2 * 2, 2))


@pytest.mark.parametrize("build,frozen", ((_mlp, "0.weight"), (_mlp, "0.bias"), (_cnn, "0.weight"), (_cnn, "0.bias"),
                                          (_cnn, "2.weight"), (_cnn, "2.bias")))
def test_dual_pass_layers_with_a_frozen_weight_or_bias(build, frozen):
    """A layer's tangent when one of W, b is frozen (no tangent): a frozen weight leaves the layer to
    torch's own formula, a frozen bias adds nothing to the tangent; on the first layer (an input
    without a tangent: lazy._tangent_free_input) and on a later convolution."""
    torch.manual_seed(0)
    model = build().double()
    dict(model.named_parameters())[frozen].requires_grad_(False)
    model0 = build().double()
    model0.load_state_dict(model.state_dict())
    lin = lazyfast.Linearized(model)
    trainable = {n: p for n, p in lin.model.named_parameters() if p.requires_grad}
    assert frozen not in trainable
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(5, 3, dtype=D) if build is _mlp else torch.randn(5, 3, 4, 4, dtype=D)
    dual = _count_dual_passes(lin)
    out = lin(x)
    assert dual == [1]
    w0 = {n: p.detach() for n, p in model0.named_parameters() if n in trainable}
    f0, t = jvp(lambda p: functional_call(model0, p, (x,), strict=False), (w0,),
                ({n: trainable[n].detach() - w0[n] for n in w0},))
    ref = f0 + t
    assert (out - ref).abs().max() <= 1e-12 * max(1.0, ref.abs().max())
    g = torch.autograd.grad((out ** 2).sum(), list(trainable.values()))
    _, fn = vjp(lambda p: functional_call(model0, p, (x,), strict=False), w0)
    (g_ref,) = fn(2 * ref.detach())
    for n, a in zip(trainable, g):
        assert (a - g_ref[n]).abs().max() <= 1e-12 * max(1.0, g_ref[n].abs().max()), n


def test_alias_guard_address_filter_still_catches_a_view_into_a_storage():
    """AliasGuard's pre-filter (parameter storages' address ranges) skips tensors outside them only:
    a view into the middle of a parameter made before the call is refused, an activation passes."""
    from lazyfast._engine.uses import AliasGuard, merge_spans, storage_key

    w = torch.randn(4, 3, dtype=D)
    other = torch.randn(4, 3, dtype=D)
    rows = w[2:]  # first element in the middle of w's storage
    st = w.untyped_storage()
    spans = merge_spans([(st.data_ptr(), st.data_ptr() + st.nbytes())])
    sub = w.clone()
    with pytest.raises(ValueError, match="alias"):
        with AliasGuard({storage_key(w): "fc.weight"}, [sub], spans):
            torch.tanh(rows)
    with AliasGuard({storage_key(w): "fc.weight"}, [sub], spans):
        torch.tanh(other) + sub  # neither is an alias
    assert merge_spans([(5, 9), (0, 3), (2, 4), (12, 13)]) == [(0, 4), (5, 9), (12, 13)]
