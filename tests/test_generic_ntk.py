"""Generic (any nn.Module) eNTK paths: memory-bounded Jacobian contraction, NTK-vector
products, the cost-model choice, parameter subsets (the structured engine's remainder), the
layerwise CNN kernel (a use of the structured engine) and the authors' extraction."""
import pytest
import torch
from torch import nn

import lazyfast
from lazyfast import kernels, reference
from lazyfast._engine.generic import choose_generic_implementation, generic_ntk, ntk_jacobian_blocked
from lazyfast.testing import assert_close_rel


class SmallCNN(nn.Module):
    def __init__(self, bias=True, k=3):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1, bias=bias)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=bias)
        self.fc = nn.Linear(4 * 2 * 2, k)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.tanh(self.c2(h))
        h = nn.functional.max_pool2d(h, 2)
        return self.fc(h.flatten(1))


def _model(bias=True, k=3):
    return SmallCNN(bias, k).double()


def _x(n, seed=0):
    return torch.randn(n, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("implementation", ["auto", "jacobian", "ntk_vp"])
@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_generic_matches_oracle(implementation, mode, symmetric):
    m = _model()
    x1, x2 = _x(5), (None if symmetric else _x(3, 1))
    got = lazyfast.empirical_ntk(m, x1, x2, mode=mode, implementation=implementation)
    assert_close_rel(got, reference.ntk_oracle(m, x1, x2, mode=mode), rtol=1e-10)


@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_blocked_chunked_equals_unchunked(mode, symmetric):
    m = _model()
    x1, x2 = _x(5), (None if symmetric else _x(3, 1))
    whole = reference.ntk_jacobian(m, x1, x2, mode=mode)
    # budgets that force parameter blocks smaller than one tensor and 1-3 sample chunks
    for budget in (20_000, 400_000):
        got = ntk_jacobian_blocked(m, x1, x2, mode=mode, memory_budget=budget)
        assert_close_rel(got, whole, rtol=1e-12, what=f"budget {budget}")
    got = generic_ntk(m, x1, x2, mode=mode, implementation="jacobian", chunk_size=2)
    assert_close_rel(got, whole, rtol=1e-12)
    got = generic_ntk(m, x1, x2, mode=mode, implementation="ntk_vp", chunk_size=4)
    assert_close_rel(got, whole, rtol=1e-12)


def test_cost_model_choice():
    # few outputs, dense: contraction is cheaper; many outputs of a cheap-to-evaluate huge-P layer: NTK-vp
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    assert choose_generic_implementation(m, torch.randn(6, 4, dtype=torch.float64), None, "full", 2**31) == "jacobian"
    wide = nn.Sequential(nn.Linear(2, 4000), nn.Linear(4000, 50)).double()
    assert choose_generic_implementation(wide, torch.randn(3, 2, dtype=torch.float64), None, "full", 2**31) == "ntk_vp"
    with pytest.raises(ValueError, match="memory_budget"):
        generic_ntk(m, torch.randn(2, 4, dtype=torch.float64), memory_budget=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("contraction", ["auto", "gradients", "pairs"])
@pytest.mark.parametrize("mode", ["trace", "full"])
def test_layerwise_matches_oracle(bias, contraction, mode):
    m = _model(bias)
    x1, x2 = _x(4), _x(3, 1)
    info = {}
    got = kernels.layerwise_ntk(m, x1, x2, mode=mode, contraction=contraction, info=info)
    assert_close_rel(got, reference.ntk_oracle(m, x1, x2, mode=mode), rtol=1e-10)
    got = kernels.layerwise_ntk(m, x1, mode=mode, contraction=contraction, memory_budget=3_000)  # tiny blocks
    assert_close_rel(got, reference.ntk_oracle(m, x1, mode=mode), rtol=1e-10)
    if contraction == "auto":
        assert info["contractions"][0] == "gradients" and info["contractions"][-1] == "pairs"


@pytest.mark.parametrize("old, new", [("auto", "auto"), ("jacobian", "gradients"), ("structured", "pairs")])
def test_layerwise_method_is_the_deprecated_spelling_of_contraction(old, new):
    """layerwise_ntk(method=) keeps working for one release: a FutureWarning, the old words mapped to
    the new ones (the per-layer orders are no longer named like the engines)."""
    m = _model()
    x = _x(3)
    info, want_info = {}, {}
    with pytest.warns(FutureWarning, match=f"contraction={new!r}"):
        got = kernels.layerwise_ntk(m, x, method=old, info=info)
    want = kernels.layerwise_ntk(m, x, contraction=new, info=want_info)
    assert torch.equal(got, want) and info["contractions"] == want_info["contractions"]
    with pytest.raises(ValueError, match="contraction="):
        kernels.layerwise_ntk(m, x, method="gradients")  # the new words are not old spellings
    with pytest.raises(TypeError, match="contraction= only"):
        kernels.layerwise_ntk(m, x, method=old, contraction="pairs")
    with pytest.raises(ValueError, match="contraction must be one of"):
        kernels.layerwise_ntk(m, x, contraction="jacobian")  # nor the old words new ones


def test_layerwise_frozen_batchnorm_and_coupled():
    m = _model()
    m.c1.weight.requires_grad_(False)  # bias-only layer
    x = _x(3)
    assert_close_rel(kernels.layerwise_ntk(m, x), reference.ntk_oracle(m, x, mode="full"), rtol=1e-10)
    bn = nn.Sequential(nn.Flatten(), nn.Linear(128, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).double()
    with pytest.raises(ValueError, match="model.eval()"):  # training mode couples the samples
        kernels.layerwise_ntk(bn, x)
    assert bn[2].num_batches_tracked.item() == 0  # and nothing ran that changed the model's state
    bn.eval()  # eval mode: BatchNorm's affine parameters have a rule
    with torch.no_grad():
        bn[2].running_var.uniform_(0.5, 2.0)
    o = reference.ntk_oracle(bn, x, mode="full")
    assert_close_rel(kernels.layerwise_ntk(bn, x), o, rtol=1e-10)
    for impl in ("auto", "jacobian"):
        k = kernels.extract_kernel(bn, x, implementation=impl)
        assert_close_rel(k, o.permute(0, 2, 1, 3).reshape(6, 6), rtol=1e-10)


@pytest.mark.parametrize("implementation", ["jacobian", "ntk_vp"])
def test_generic_on_a_parameter_subset(implementation):
    """names=: the other parameters are constants (the structured engine's remainder)."""
    m = _model()
    x1, x2 = _x(4), _x(3, 1)
    names = ["c2.weight", "fc.bias"]
    frozen = _model()
    frozen.load_state_dict(m.state_dict())
    for n, p in frozen.named_parameters():
        p.requires_grad_(n in names)
    for mode in ("trace", "full"):
        got = generic_ntk(m, x1, x2, mode=mode, implementation=implementation, names=names, chunk_size=2)
        assert_close_rel(got, reference.ntk_oracle(frozen, x1, x2, mode=mode), rtol=1e-10)
    with pytest.raises(ValueError, match="names"):
        generic_ntk(m, x1, names=["nope"], implementation=implementation)


def test_centered_and_extract_kernel_layout():
    m = _model()
    c = kernels.centered(m)
    x = _x(4)
    assert torch.equal(c(x), torch.zeros(4, 3, dtype=torch.float64))
    o = reference.ntk_oracle(m, x, mode="full")  # centering does not change the kernel
    want = o.permute(0, 2, 1, 3).reshape(12, 12)  # row = k·n + class
    for impl in ("auto", "structured", "jacobian"):
        got = kernels.extract_kernel(c, x, implementation=impl)
        assert got.dtype == torch.float64 and got.shape == (12, 12)
        assert_close_rel(got, want, rtol=1e-10, what=impl)
    assert_close_rel(reference.per_output_loop_kernel(c, x, batch_size=3), want, rtol=1e-10)
    with pytest.warns(FutureWarning, match="renamed 'structured'"):  # the 0.1 name, for one release
        assert_close_rel(kernels.extract_kernel(c, x, implementation="layerwise"), want, rtol=1e-10)
    assert not c.frozen.training and not c.train().frozen.training  # the frozen copy stays in eval mode
    assert c.model.training


@pytest.mark.slow
def test_vgg11_extract_matches_authors_loop():
    torch.manual_seed(0)
    net = kernels.centered(lazyfast.vgg11(num_classes=3)).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = reference.per_output_loop_kernel(net, x, batch_size=1)
    got = kernels.extract_kernel(net, x)
    assert got.shape == (6, 6)
    assert_close_rel(got, ref, rtol=1e-10)
    # float32 gradients (the authors' setting), float64 kernel: close to the float64 kernel
    net32 = kernels.centered(lazyfast.vgg11(num_classes=3))
    net32.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    assert_close_rel(kernels.extract_kernel(net32, x.float()), ref, rtol=1e-5)
