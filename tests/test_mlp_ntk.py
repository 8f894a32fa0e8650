"""Structured eNTK of deep MLPs (lazyfast.empirical_ntk route for lazyfast.models.MLP)."""
import itertools
import math

import pytest
import torch

import lazyfast
from lazyfast import _ext, reference
from lazyfast._engine.mlp import mlp_ntk
from lazyfast.models import ACTIVATIONS, MLP, TwoLayer
from lazyfast.testing import assert_close_rel


def _mlp(depth, act, bias, par, k, d=4, dtype=torch.float64):
    widths = [5, 3, 6, 4][:depth]
    m = MLP(d, widths, k, activation=act, bias=bias, parametrization=par, dtype=dtype)
    if bias:  # biases start at 0: make them non-zero so they matter in σ'
        with torch.no_grad():
            for layer in m.layers:
                layer.bias.normal_(0, 0.5)
    return m


# depth 1-4 × activation × bias × parametrization × k, in a covering table (not the full product,
# to keep the oracle's per-sample backward loops cheap): every value of every factor appears
# with every depth and with both modes.
_GRID = []
for i, (depth, act) in enumerate(itertools.product([1, 2, 3, 4], ACTIVATIONS)):
    _GRID.append((depth, act, bool(i % 2), ("ntk", "standard")[(i // 2) % 2], (1, 3)[(i // 5) % 2]))
    _GRID.append((depth, act, not (i % 2), ("standard", "ntk")[(i // 2) % 2], (3, 1)[(i // 5) % 2]))


@pytest.mark.parametrize("depth,act,bias,par,k", _GRID)
@pytest.mark.parametrize("mode", ["trace", "full"])
def test_matches_oracle(depth, act, bias, par, k, mode):
    m = _mlp(depth, act, bias, par, k)
    x1 = torch.randn(5, 4, dtype=torch.float64)
    x2 = torch.randn(3, 4, dtype=torch.float64)
    got = lazyfast.empirical_ntk(m, x1, x2, mode=mode, implementation="structured")
    assert_close_rel(got, reference.ntk_oracle(m, x1, x2, mode=mode), rtol=1e-10, what=f"{act} {par}")
    got_sym = lazyfast.empirical_ntk(m, x1, mode=mode)  # auto routes MLPs to the structured path
    assert_close_rel(got_sym, reference.ntk_oracle(m, x1, mode=mode), rtol=1e-10)


def test_depth0_and_layerwise_reference():
    m = MLP(3, [], 2, bias=True, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert_close_rel(mlp_ntk(m, x, mode="full"), reference.ntk_oracle(m, x, mode="full"))
    m = _mlp(3, "tanh", True, "ntk", 3)
    x = torch.randn(6, 4, dtype=torch.float64)
    assert_close_rel(reference.mlp_ntk_layerwise(m, x, mode="full"), reference.ntk_oracle(m, x, mode="full"))


@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_chunked_equals_unchunked(mode, symmetric):
    m = _mlp(3, "gelu", True, "ntk", 3)
    x1 = torch.randn(23, 4, dtype=torch.float64)
    x2 = None if symmetric else torch.randn(17, 4, dtype=torch.float64)
    whole = mlp_ntk(m, x1, x2, mode=mode)
    for c in (1, 5, 16):
        assert_close_rel(mlp_ntk(m, x1, x2, mode=mode, chunk_size=c), whole, rtol=1e-12)
    # memory_budget drives the chunk size when chunk_size is None
    assert_close_rel(lazyfast.empirical_ntk(m, x1, x2, mode=mode, memory_budget=8000), whole, rtol=1e-12)


def test_float32_and_large_tile_crossing():
    m = _mlp(2, "relu", True, "standard", 1, d=8, dtype=torch.float32)
    x = torch.randn(300, 8)
    got = lazyfast.empirical_ntk(m, x)
    md = _mlp(2, "relu", True, "standard", 1, d=8)
    md.load_state_dict({k_: v.double() for k_, v in m.state_dict().items()})
    ref = reference.mlp_ntk_layerwise(md, x.double())
    assert got.dtype == torch.float32
    assert_close_rel(got, ref, rtol=1e-5)
    assert torch.equal(got, got.T)


def test_empty_batch_and_errors():
    m = _mlp(2, "relu", True, "ntk", 3)
    assert lazyfast.empirical_ntk(m, torch.zeros(0, 4, dtype=torch.float64), mode="full").shape == (0, 0, 3, 3)
    lin, xl = torch.nn.Linear(4, 2).double(), torch.randn(3, 4, dtype=torch.float64)
    assert_close_rel(lazyfast.empirical_ntk(lin, xl, mode="full", implementation="structured"),
                     reference.ntk_oracle(lin, xl, mode="full"), rtol=1e-10)  # any module has a structured eNTK
    with pytest.raises(ValueError, match="x1"):
        lazyfast.empirical_ntk(m, torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="mlp"):
        mlp_ntk(torch.nn.Linear(4, 2), torch.randn(2, 4))
    with pytest.raises(ValueError, match="x2"):
        mlp_ntk(m, torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="x1"):
        mlp_ntk(m, torch.randn(2, 4))  # float32 inputs, float64 model
    with pytest.raises(ValueError, match="memory_budget"):
        mlp_ntk(m, torch.randn(2, 4, dtype=torch.float64), memory_budget=0)
    with pytest.raises(ValueError, match="chunk_size"):
        mlp_ntk(m, torch.randn(2, 4, dtype=torch.float64), chunk_size=0)


def test_frozen_parameters():
    m = _mlp(2, "tanh", True, "ntk", 3)
    m.layers[0].weight.requires_grad_(False)  # a bias-only layer
    m.layers[2].bias.requires_grad_(False)
    x = torch.randn(4, 4, dtype=torch.float64)
    for f in (lambda: lazyfast.empirical_ntk(m, x, mode="full"), lambda: mlp_ntk(m, x, mode="full")):
        assert_close_rel(f(), reference.ntk_oracle(m, x, mode="full"), rtol=1e-10)


def test_no_autograd_graph_is_returned():
    """The kernel is a plain tensor: no hadamard_gram_sum backward graph keeps the factors alive."""
    m = _mlp(3, "relu", True, "ntk", 2)
    x = torch.randn(9, 4, dtype=torch.float64)
    for K in (lazyfast.empirical_ntk(m, x, memory_budget=4096), mlp_ntk(m, x, mode="full"),
              lazyfast.empirical_ntk(m, x, x[:3])):
        assert not K.requires_grad and K.grad_fn is None


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_depth1_mlp_matches_two_layer(act, bias):
    """A depth-1 NTK-parametrized MLP computes (1/√m) W2 σ(W1 x/√d + b1) + b2; TwoLayer computes
    s·B σ(Ax + c) with s = 1/√m. With A = W1/√d, c = b1, B = W2: same function, and for the
    weights ∂f/∂W1 = (1/√d)·∂f/∂A, so Θ_MLP = Θ_TwoLayer − (A-part) + (1/d)·(A-part) [+ b2 part: δ_ab].
    Cheaper to check: the A-part of TwoLayer is its kernel minus its B/c-parts, so compare the MLP
    kernel with the kernel of a TwoLayer on inputs x/√d (then ∂f/∂A is exactly the MLP's ∂f/∂W1)."""
    d, mw, k = 5, 7, 3
    mlp = MLP(d, [mw], k, activation=act, bias=bias, dtype=torch.float64)
    if bias:
        with torch.no_grad():
            mlp.layers[0].bias.normal_()
    two = TwoLayer(d, mw, k, activation=act, bias=bias, scale=1 / math.sqrt(mw), dtype=torch.float64)
    with torch.no_grad():
        two.hidden.weight.copy_(mlp.layers[0].weight)  # acts on x/√d
        if bias:
            two.hidden.bias.copy_(mlp.layers[0].bias)
        two.output.weight.copy_(mlp.layers[1].weight)
    x = torch.randn(6, d, dtype=torch.float64)
    xs = x / math.sqrt(d)
    assert_close_rel(mlp(x) - (mlp.layers[1].bias if bias else 0), two(xs))
    kt = reference.ntk_jacobian(two, xs, mode="full")
    if bias:  # the MLP's output bias adds δ_ab to every pair
        kt = kt + torch.eye(k, dtype=torch.float64)
    assert_close_rel(lazyfast.empirical_ntk(mlp, x, mode="full"), kt, rtol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and _ext.HAS_CUDA_KERNELS), reason="needs a GPU and CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["trace", "full"])
def test_cuda_matches_cpu(dtype, mode):
    m = _mlp(3, "gelu", True, "ntk", 3, dtype=dtype)
    x1, x2 = torch.randn(37, 4, dtype=dtype), torch.randn(20, 4, dtype=dtype)
    cpu = lazyfast.empirical_ntk(m, x1, x2, mode=mode)
    mc = m.cuda()
    gpu = lazyfast.empirical_ntk(mc, x1.cuda(), x2.cuda(), mode=mode)
    assert_close_rel(gpu.cpu(), cpu, rtol=1e-10 if dtype == torch.float64 else 1e-5)
