"""LazyModel, Linearized and the FrozenPatternNet surrogate (float64, tight tolerances)."""
import copy
import math

import pytest
import torch
from torch import nn

import lazyfast
from lazyfast import reference
from lazyfast.lazy import FrozenPatternNet, LazyModel, Linearized, scaled_loss, square_loss
from lazyfast.models import MLP, TwoLayer
from lazyfast.testing import rel_err

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn(dtype=F64):
    """A VGG-shaped CNN small enough for oracles: 8×8 inputs, two conv/ReLU/pool stages."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.classifier = nn.Linear(16, 3)

        def forward(self, x):
            return self.classifier(self.features(x).flatten(1))

    return Tiny().to(dtype)


MODELS = {
    "twolayer_relu_k1": (lambda: TwoLayer(5, 9, 1, activation="relu", dtype=F64), (7, 5)),
    "twolayer_tanh_bias_k3": (lambda: TwoLayer(5, 9, 3, activation="tanh", bias=True, dtype=F64), (7, 5)),
    "mlp_gelu_k2": (lambda: MLP(4, [6, 5], 2, activation="gelu", dtype=F64), (6, 4)),
    "cnn": (lambda: tiny_cnn(), (3, 2, 8, 8)),
}


def perturb_(module, scale=1e-2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def flat_delta(lin):
    return torch.cat([(p - p0).detach().reshape(-1) for (n, p), p0 in
                      zip(lin.model.named_parameters(), lin.model0.parameters())])


@pytest.mark.parametrize("impl", ["products", "cached", "auto"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_linearized_forward_and_gradient_match_oracle(name, impl):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    net = make()
    x = torch.randn(*shape, dtype=F64)
    lin = Linearized(net, implementation=impl)
    assert rel_err(lin(x), net(x).reshape(x.shape[0], -1)) == 0.0  # exact at w0
    perturb_(lin.model)
    # independent oracle: per-example autograd gradients of the network at w0
    G = reference.per_example_gradients(net, x)  # (n, k, P)
    f0 = net(x).reshape(x.shape[0], -1).detach()
    expect = f0 + torch.einsum("nkp,p->nk", G, flat_delta(lin))
    out = lin(x)
    assert rel_err(out, expect) <= 1e-12
    r = torch.randn_like(out)
    (out * r).sum().backward()
    grad = torch.cat([p.grad.reshape(-1) for p in lin.model.parameters()])
    assert rel_err(grad, torch.einsum("nkp,nk->p", G, r)) <= 1e-12
    # a second step on the same batch (auto switches to the cached linearization here)
    perturb_(lin.model, seed=2)
    for p in lin.model.parameters():
        p.grad = None
    out = lin(x)
    assert rel_err(out, f0 + torch.einsum("nkp,p->nk", G, flat_delta(lin))) <= 1e-12
    (out * r).sum().backward()
    grad = torch.cat([p.grad.reshape(-1) for p in lin.model.parameters()])
    assert rel_err(grad, torch.einsum("nkp,nk->p", G, r)) <= 1e-12
    if impl == "cached" or (impl == "auto" and not lin._fused_serves()):
        assert lin._cache[0].linearization is not None
    elif impl == "auto":  # the compiled two-layer kernels serve it: nothing cached but the primal
        assert lin._cache[0].linearization is None
    # w0 untouched and frozen
    assert all(not p.requires_grad for p in lin.model0.parameters())
    assert all(torch.equal(p, q) for p, q in zip(lin.model0.parameters(), net.parameters()))


@pytest.mark.parametrize("impl", ["products", "cached"])
def test_linearized_gradcheck(impl):
    torch.manual_seed(0)
    net = TwoLayer(3, 6, 2, activation="tanh", bias=True, dtype=F64)
    lin = Linearized(net, implementation=impl)
    perturb_(lin.model)
    x = torch.randn(4, 3, dtype=F64)
    params = tuple(lin.model.parameters())

    def f(*ps):
        # ps are the same tensors as lin.model's parameters; gradcheck perturbs them in place
        return lin.tangent(x)

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("impl", ["products", "cached"])
def test_linearized_only_trainable_parameters_move(impl):
    torch.manual_seed(0)
    net = TwoLayer(4, 6, 1, bias=True, dtype=F64)
    net.hidden.bias.requires_grad_(False)
    lin = Linearized(net, implementation=impl)
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == ["model.hidden.weight", "model.output.weight"]
    x = torch.randn(5, 4, dtype=F64)
    lin(x).sum().backward()
    assert lin.model.hidden.bias.grad is None
    # the JVP sees w - w0 only for trainable parameters: a change of the frozen bias has no effect
    with torch.no_grad():
        lin.model.hidden.bias.add_(1.0)
    assert rel_err(lin(x), net(x)) == 0.0


def test_linearized_caches_primal_and_invalidates():
    torch.manual_seed(0)
    net = TwoLayer(4, 6, 1, dtype=F64)
    lin = Linearized(net, cache_size=2)
    x, z, u = (torch.randn(5, 4, dtype=F64) for _ in range(3))
    p = lin.primal(x)
    assert lin.primal(x) is p  # cached: the same tensor comes back
    assert lin.primal(x.clone()) is not p  # matched by identity, not by address or value
    x.mul_(2.0)  # in-place edit: new version, new primal
    assert lin.primal(x) is not p
    assert rel_err(lin(x), net(x)) == 0.0
    px = lin.primal(x)
    lin.primal(z)
    assert lin.primal(x) is px  # two entries kept
    lin.primal(u)
    lin.primal(z)
    assert lin.primal(x) is not px  # evicted (least recent first)
    lin.clear_cache()
    assert lin.primal(z) is not lin.primal(u) and lin._cache[0].x is u
    lin0 = Linearized(net, cache_size=0)
    assert lin0.primal(z) is not lin0.primal(z)
    with pytest.raises(ValueError, match="cache_size"):
        Linearized(net, cache_size=-1)
    with pytest.raises(ValueError, match="cache_size"):
        Linearized(net, implementation="cached", cache_size=0)
    with pytest.raises(ValueError, match="implementation"):
        Linearized(net, implementation="fused")


def test_linearized_copies_and_pickles_after_caching(tmp_path):
    torch.manual_seed(0)
    lin = Linearized(TwoLayer(4, 6, 1, dtype=F64), implementation="cached")
    x = torch.randn(5, 4, dtype=F64)
    perturb_(lin.model)
    out = lin(x)
    assert lin._cache[0].linearization is not None
    twin = copy.deepcopy(lin)
    assert twin._cache == [] and rel_err(twin(x), out) == 0.0
    torch.save(lin, tmp_path / "lin.pt")
    back = torch.load(tmp_path / "lin.pt", weights_only=False)
    assert rel_err(back(x), out) == 0.0


def test_linearized_auto_caches_only_reused_batches():
    torch.manual_seed(0)
    lin = Linearized(MLP(4, [6], 1, dtype=F64))  # no fused kernels for MLPs: the generic auto path
    x = torch.randn(5, 4, dtype=F64)
    lin(x)
    assert lin._cache[0].linearization is None  # seen once: nothing built
    lin(x)
    assert lin._cache[0].linearization is not None  # reused: linearization kept
    for _ in range(3):
        lin(torch.randn(5, 4, dtype=F64))  # fresh mini-batches never build one
    assert all(e.linearization is None for e in lin._cache if e.x is not x)
    assert lin._cache[-1].x is x  # the batches gone do not push out one that is still held


def test_linearized_cache_does_not_keep_a_batch_alive():
    """Mini-batch SGD makes a new batch tensor every step: the cache holds each by a weak reference,
    so a dropped batch is freed (its entry then matches nothing and is pruned)."""
    import gc
    import weakref

    torch.manual_seed(0)
    lin = Linearized(MLP(4, [6], 1, dtype=F64))
    x = torch.randn(5, 4, dtype=F64)
    lin(x)
    ref = weakref.ref(x)
    del x
    gc.collect()
    assert ref() is None
    x2 = torch.randn(5, 4, dtype=F64)
    lin(x2)
    assert [e.x for e in lin._cache] == [x2]  # the dead entry pruned


@pytest.mark.skipif(not lazyfast._ext.HAS_CPU_KERNELS, reason="needs the compiled two-layer kernels")
def test_linearized_auto_uses_fused_kernels_for_two_layer():
    torch.manual_seed(0)
    lin = Linearized(TwoLayer(4, 6, 1, dtype=F64))
    assert lin._fused_serves()
    x = torch.randn(5, 4, dtype=F64)
    for _ in range(3):
        lin(x)
    assert lin._cache[0].linearization is None  # fused JVP/VJP every step, only the primal cached
    # ...unless a parameter is frozen (the fused kernels linearize all of A, c, B)
    net = TwoLayer(4, 6, 1, bias=True, dtype=F64)
    net.hidden.bias.requires_grad_(False)
    assert not Linearized(net)._fused_serves()


def test_linearized_state_dict_roundtrip_refreshes_cache():
    torch.manual_seed(0)
    a, b = Linearized(TwoLayer(4, 6, 1, dtype=F64)), Linearized(TwoLayer(4, 6, 1, dtype=F64))
    x = torch.randn(5, 4, dtype=F64)
    b(x)  # fills b's cache with its own w0
    perturb_(a.model)
    b.load_state_dict(a.state_dict())
    assert rel_err(b(x), a(x)) == 0.0


def test_linearized_input_gradient_is_refused():
    lin = Linearized(TwoLayer(3, 4, 1, dtype=F64))
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError, match="input x"):
        lin(x).sum().backward()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lazy_model_is_zero_at_init_and_scaled(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    net = make()
    x = torch.randn(*shape, dtype=F64)
    lazy = LazyModel(net, 1e3)
    assert lazy(x).abs().max() == 0
    assert all(not p.requires_grad for p in lazy.model0.parameters())
    perturb_(net)
    h = net(x).reshape(x.shape[0], -1) - lazy.model0(x).reshape(x.shape[0], -1)
    assert rel_err(lazy(x), 1e3 * h) <= 1e-14


def test_frozen_copies_stay_in_eval_mode():
    net = tiny_cnn()
    for wrapper, frozen in ((LazyModel(net, 2.0), "model0"), (Linearized(net), "model0"),
                            (FrozenPatternNet(net), "initial")):
        wrapper.train()
        assert getattr(wrapper, frozen).training is False
        assert wrapper.training is True


def test_lazy_model_center_false_needs_symmetric_init():
    sym = TwoLayer(4, 8, 2, symmetric=True, dtype=F64)
    x = torch.randn(5, 4, dtype=F64)
    lazy = LazyModel(sym, 10.0, center=False)
    assert lazy.model0 is None
    assert lazy(x).abs().max() <= 1e-13
    with pytest.raises(ValueError, match="symmetrized init"):
        LazyModel(TwoLayer(4, 8, 2, dtype=F64), 10.0, center=False)
    # a linearization of a symmetric net also vanishes at w0
    LazyModel(Linearized(sym), 10.0, center=False)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_lazy_model_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        LazyModel(TwoLayer(3, 4, 1), alpha)
    with pytest.raises(ValueError, match="alpha"):
        scaled_loss(torch.zeros(2, 1), torch.zeros(2, 1), alpha)


def test_lazy_model_rejects_bad_types_and_shapes():
    with pytest.raises(TypeError, match="alpha"):
        LazyModel(TwoLayer(3, 4, 1), "big")
    with pytest.raises(TypeError, match="model"):
        LazyModel("net", 1.0)
    with pytest.raises(TypeError, match="center"):
        LazyModel(TwoLayer(3, 4, 1), 1.0, center=1)
    lin = Linearized(TwoLayer(3, 4, 1, dtype=F64))
    with pytest.raises(ValueError, match=r"x must have shape \(n, 3\)"):
        lin(torch.randn(2, 5, dtype=F64))
    with pytest.raises(ValueError, match="x contains NaN"):
        lin(torch.tensor([[0.0, float("nan"), 1.0]], dtype=F64))
    with pytest.raises(TypeError, match="dtype"):
        lin(torch.randn(2, 3, dtype=torch.float32))


def test_scaled_losses():
    pred = torch.randn(6, 3, dtype=F64)
    y = torch.randn(6, 3, dtype=F64)
    assert math.isclose(float(scaled_loss(pred, y, 4.0)), float(0.5 * ((pred - y) ** 2).sum() / 6 / 16), rel_tol=1e-14)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    onehot = torch.nn.functional.one_hot(labels, 3).to(F64)
    assert float(square_loss(pred, labels)) == float(square_loss(pred, onehot))
    ce = torch.nn.functional.cross_entropy(pred, labels)
    assert math.isclose(float(scaled_loss(pred, labels, 2.0, "cross_entropy")), float(ce) / 4, rel_tol=1e-14)
    with pytest.raises(ValueError, match="loss"):
        scaled_loss(pred, y, 1.0, "hinge")
    with pytest.raises(ValueError, match="target"):
        square_loss(pred, y[:, :2])


def _gd(model, x, y, alpha, steps, lr):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (square_loss(model(x), y) / alpha ** 2).backward()
        opt.step()
    return model


def test_lazy_model_tracks_linearized_at_large_alpha():
    """Theorem 2.2: ‖αh(w_α) − αh̄(w̄_α)‖ = O(1/α); at α = 1e5 the gap is ~1e-5 of the outputs,
    and it shrinks ~10× per decade of α."""
    torch.manual_seed(0)
    net = TwoLayer(4, 16, 1, activation="tanh", dtype=F64)
    x = torch.randn(12, 4, dtype=F64)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.sin(3 * x[:, :1])
    gaps = {}
    for alpha in (1e4, 1e5):
        lazy = _gd(LazyModel(copy.deepcopy(net), alpha), x, y, alpha, 30, 0.5)
        lin = _gd(LazyModel(Linearized(net), alpha), x, y, alpha, 30, 0.5)
        with torch.no_grad():
            a, b = lazy(x), lin(x)
        assert float(b.abs().max()) > 0.1  # the predictor really moved
        gaps[alpha] = float((a - b).norm() / b.norm())
    assert gaps[1e5] < 1e-4
    assert 7 < gaps[1e4] / gaps[1e5] < 13


def test_frozen_pattern_net_on_vgg11():
    torch.manual_seed(0)
    net = lazyfast.vgg11(num_classes=3, in_channels=1).double()
    x = torch.randn(2, 1, 32, 32, dtype=F64)
    sur = FrozenPatternNet(net, alpha=10.0)
    st = sur.stability(x)
    assert sum(k.startswith("relu") for k in st) == 8 and sum(k.startswith("maxpool") for k in st) == 5
    assert set(st.values()) == {1.0}
    with torch.no_grad():
        net.features[0].weight.add_(0.5)
    st = sur.stability(x)
    assert st["relu0"] < 1.0
    out = sur(x)
    assert out.shape == (2, 3) and float(out.detach().abs().max()) > 0
    out.sum().backward()
    assert net.features[0].weight.grad is not None  # trains the current weights


def test_frozen_pattern_net_surrogate():
    torch.manual_seed(0)
    net = tiny_cnn()
    x = torch.randn(3, 2, 8, 8, dtype=F64)
    sur = FrozenPatternNet(net, alpha=1.0)
    assert sur(x).abs().max() == 0  # centered like the authors
    assert sur.stability(x) == {"relu0": 1.0, "maxpool0": 1.0, "relu1": 1.0, "maxpool1": 1.0}
    lin = Linearized(net)
    net0 = copy.deepcopy(net)
    diffs = []
    for scale in (1e-3, 1e-4):
        lin.model.load_state_dict(net0.state_dict())
        perturb_(lin.model, scale)
        net.load_state_dict(lin.model.state_dict())  # the surrogate follows `net` by reference
        f0 = net0(x)
        s, ell = sur(x), lin(x) - f0
        assert float(ell.detach().abs().max()) > 0
        diffs.append(float((s - ell).detach().abs().max() / ell.detach().abs().max()))
    # same value and Jacobian at w0: the relative difference is O(‖w − w0‖), not O(1)
    assert diffs[0] < 0.05
    assert 5 < diffs[0] / diffs[1] < 20
    with pytest.raises(TypeError, match="features"):
        FrozenPatternNet(TwoLayer(3, 4, 1))
    bad = tiny_cnn()
    bad.features[1] = nn.Tanh()
    with pytest.raises(TypeError, match="Tanh"):
        FrozenPatternNet(bad)
    with pytest.raises(ValueError, match="alpha"):
        FrozenPatternNet(tiny_cnn(), alpha=0.0)


@pytest.mark.parametrize("impl", ["products", "cached"])
def test_linearized_float32_matches_float64(impl):
    torch.manual_seed(0)
    net = TwoLayer(6, 33, 3, activation="gelu", bias=True, dtype=F64)
    x = torch.randn(17, 6, dtype=F64)
    lin64 = Linearized(net, implementation=impl)
    perturb_(lin64.model, 0.05)
    lin32 = copy.deepcopy(lin64).float()
    x32 = x.float()
    out64, out32 = lin64(x), lin32(x32)
    out32 = lin32(x32)  # the cached path on the second call
    assert out32.dtype == torch.float32
    assert rel_err(out32, out64) <= 1e-5
    r = torch.randn_like(out64)
    (out64 * r).sum().backward()
    (out32 * r.float()).sum().backward()
    for p64, p32 in zip(lin64.model.parameters(), lin32.model.parameters()):
        assert rel_err(p32.grad, p64.grad) <= 1e-5


def test_a_parameter_view_held_by_the_model_gets_a_clear_error_from_every_copy():
    """A view of a parameter made with grad on in __init__ (self.rows = self.fc.weight[1:]) cannot be
    deep-copied: Linearized, LazyModel and frozen_copy refuse it with a ValueError naming the attribute
    and the fix, not torch's deepcopy RuntimeError."""
    from lazyfast.lazy import LazyModel, frozen_copy

    class Held(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(3, 4), nn.Linear(3, 1)
            self.rows = self.fc.weight[1:]

        def forward(self, x):
            return self.out(torch.tanh(x @ self.rows.T + self.fc(x)[:, 1:]))

    for make in (Linearized, lambda m: LazyModel(m, 10.0), frozen_copy):
        with pytest.raises(ValueError, match=r"rows.*inside forward"):
            make(Held())
