"""The pure-PyTorch references agree with the per-example-gradient oracle (float64)."""
import pytest
import torch
from torch import nn

import lazyfast
from lazyfast import reference
from lazyfast._engine import generic
from lazyfast.models import ACTIVATIONS, MLP, TwoLayer
from lazyfast.testing import assert_close_rel

F64 = torch.float64


class SmallCNN(nn.Module):
    def __init__(self, k=3):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3, k)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def _two_layer(activation="relu", bias=False, k=1, m=9, d=4):
    return TwoLayer(d, m, k, activation=activation, bias=bias, dtype=F64)


def _cases():
    for act in ACTIVATIONS:
        for bias in (False, True):
            for k in (1, 3):
                yield pytest.param(_two_layer(act, bias, k), torch.randn(5, 4, dtype=F64),
                                   torch.randn(3, 4, dtype=F64), id=f"twolayer-{act}-bias{int(bias)}-k{k}")
    for param in ("ntk", "standard"):
        yield pytest.param(MLP(4, [6, 5], 3, activation="tanh", parametrization=param, dtype=F64),
                           torch.randn(4, 4, dtype=F64), torch.randn(2, 4, dtype=F64), id=f"mlp-{param}")
    yield pytest.param(SmallCNN().double(), torch.randn(3, 2, 6, 6, dtype=F64), torch.randn(2, 2, 6, 6, dtype=F64),
                       id="cnn")


@pytest.mark.parametrize("model,x1,x2", list(_cases()))
@pytest.mark.parametrize("mode", ["trace", "full"])
def test_references_match_oracle(model, x1, x2, mode):
    want = reference.ntk_oracle(model, x1, x2, mode=mode)
    assert_close_rel(reference.ntk_jacobian(model, x1, x2, mode=mode), want, dtype=F64, what="jacobian")
    assert_close_rel(generic.ntk_ntkvp(model, x1, x2, mode=mode), want, dtype=F64, what="ntk_vp")
    assert_close_rel(lazyfast.empirical_ntk(model, x1, x2, mode=mode), want, dtype=F64, what="empirical_ntk auto")


def test_trace_is_mean_of_full_diagonal():
    model = _two_layer("gelu", True, 3)
    x = torch.randn(6, 4, dtype=F64)
    full = lazyfast.empirical_ntk(model, x, mode="full")
    trace = lazyfast.empirical_ntk(model, x, mode="trace")
    assert full.shape == (6, 6, 3, 3) and trace.shape == (6, 6)
    assert_close_rel(trace, torch.diagonal(full, dim1=2, dim2=3).mean(-1), dtype=F64)


@pytest.mark.parametrize("implementation", ["auto", "jacobian", "ntk_vp"])
def test_x2_none_equals_x1(implementation):
    model = _two_layer("tanh", True, 3)
    x = torch.randn(7, 4, dtype=F64)
    a = lazyfast.empirical_ntk(model, x, implementation=implementation, mode="full")
    b = lazyfast.empirical_ntk(model, x, x, implementation=implementation, mode="full")
    assert_close_rel(a, b, dtype=F64)
    assert_close_rel(a, a.permute(1, 0, 3, 2), dtype=F64, what="symmetry")


@pytest.mark.parametrize("implementation", ["jacobian", "ntk_vp"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_equals_unchunked(implementation, chunk):
    model = MLP(3, [8], 2, activation="softplus", dtype=F64)
    x1, x2 = torch.randn(7, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    whole = lazyfast.empirical_ntk(model, x1, x2, mode="full", implementation=implementation)
    chunked = lazyfast.empirical_ntk(model, x1, x2, mode="full", implementation=implementation, chunk_size=chunk)
    assert_close_rel(chunked, whole, dtype=F64)


def test_auto_respects_memory_budget():
    model = _two_layer("relu", False, 1, m=50, d=10)
    x = torch.randn(40, 10, dtype=F64)
    per_sample = 1 * sum(p.numel() for p in model.parameters()) * 8
    assert lazyfast.ntk.auto_chunk_size(model, x, memory_budget=10 * per_sample) == 5
    small = lazyfast.empirical_ntk(model, x, memory_budget=4 * per_sample)
    assert_close_rel(small, lazyfast.empirical_ntk(model, x), dtype=F64)


def test_empty_batches():
    model = _two_layer("relu", True, 3)
    x = torch.randn(4, 4, dtype=F64)
    e = torch.empty(0, 4, dtype=F64)
    for impl in ("jacobian", "ntk_vp"):
        assert lazyfast.empirical_ntk(model, e, x, implementation=impl).shape == (0, 4)
        assert lazyfast.empirical_ntk(model, x, e, implementation=impl, mode="full").shape == (4, 0, 3, 3)


def _flat_tangents(model, T, dtype=F64):
    return {n: torch.randn((T,) + p.shape, dtype=dtype) for n, p in model.named_parameters()}


@pytest.mark.parametrize("k", [1, 3])
def test_jvp_vjp_ntkvp_match_oracle_jacobian(k):
    model = _two_layer("gelu", True, k)
    x1, x2 = torch.randn(5, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    J1 = reference.per_example_gradients(model, x1)  # (n, k, P)
    J2 = reference.per_example_gradients(model, x2)
    names = [n for n, _ in model.named_parameters()]
    tangents = _flat_tangents(model, 4)
    V = torch.cat([tangents[n].reshape(4, -1) for n in names], dim=1)  # (T, P)
    assert_close_rel(lazyfast.jvp(model, x1, tangents), torch.einsum("iap,tp->tia", J1, V), dtype=F64, what="jvp")
    R = torch.randn(5, k, dtype=F64)
    g = lazyfast.vjp(model, x1, R)
    flat = torch.cat([g[n].reshape(-1) for n in names])
    assert_close_rel(flat, torch.einsum("iap,ia->p", J1, R), dtype=F64, what="vjp")
    v = torch.randn(3, k, dtype=F64)
    want = torch.einsum("iap,jbp,jb->ia", J1, J2, v)
    assert_close_rel(lazyfast.ntk_vp(model, x1, v, x2), want, dtype=F64, what="ntk_vp")


def test_jvp_missing_names_are_zero_and_unknown_names_rejected():
    model = _two_layer("relu", True, 2)
    x = torch.randn(4, 4, dtype=F64)
    t = {"output.weight": torch.randn(2, 2, 9, dtype=F64)}
    full = dict(t, **{"hidden.weight": torch.zeros(2, 9, 4, dtype=F64), "hidden.bias": torch.zeros(2, 9, dtype=F64)})
    assert_close_rel(lazyfast.jvp(model, x, t), lazyfast.jvp(model, x, full), dtype=F64)
    with pytest.raises(ValueError, match="not trainable parameters"):
        lazyfast.jvp(model, x, {"nope": torch.zeros(1, 3, dtype=F64)})
    with pytest.raises(ValueError, match=r"tangents\['output.weight'\] must have shape"):
        lazyfast.jvp(model, x, {"output.weight": torch.zeros(2, 9, dtype=F64)})


def test_frozen_parameters_are_constants():
    model = _two_layer("tanh", True, 1)
    model.hidden.bias.requires_grad_(False)
    x = torch.randn(4, 4, dtype=F64)
    assert_close_rel(lazyfast.empirical_ntk(model, x), reference.ntk_oracle(model, x), dtype=F64)


def test_gram_of_oracle_jacobians_is_the_ntk():
    model = _two_layer("softplus", True, 1)
    x = torch.randn(6, 4, dtype=F64)
    J = reference.per_example_gradients(model, x)[:, 0, :]
    assert_close_rel(lazyfast.gram(J), lazyfast.empirical_ntk(model, x), dtype=F64)
