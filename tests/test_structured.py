"""The structured eNTK engine (lazyfast.structured) and `auto` routing to it, against the
per-example autograd oracle (float64, 1e-10) on the models users bring."""
import ast
import pathlib
import types

import pytest
import torch
from torch import nn

import lazyfast
from lazyfast import reference
from lazyfast._engine import structured
from lazyfast._engine.structured import contract
from lazyfast.models import MLP, TwoLayer
from lazyfast.testing import assert_close_rel

D = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _x(n, *shape, seed=0):
    return torch.randn((n,) + shape, dtype=D, generator=_g(seed))


def _check(m, x1, x2=None, modes=("trace", "full"), impl="structured", rtol=1e-10, **kw):
    for mode in modes:
        want = reference.ntk_oracle(m, x1, x2, mode=mode)
        got = lazyfast.empirical_ntk(m, x1, x2, mode=mode, implementation=impl, **kw)
        assert not got.requires_grad and got.grad_fn is None
        assert got.shape == want.shape
        assert_close_rel(got, want, rtol=rtol, what=f"{type(m).__name__} {mode}")


def _randomize_norms(m):
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
            if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if mod.weight is not None:
                    mod.weight.normal_(1, 0.3)
                if mod.bias is not None:
                    mod.bias.normal_(0, 0.3)
    return m


class CNN(nn.Module):
    """BatchNorm (eval), stride, padding (zeros, reflect), grouped and depthwise convolutions, pooling."""

    def __init__(self, k=3):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
        self.c3 = nn.Conv2d(8, 6, 2, dilation=2, padding="same", padding_mode="circular")
        self.fc = nn.Linear(6 * 2 * 2, k)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.tanh(self.c2(h))
        h = torch.relu(self.dw(h))
        h = nn.functional.avg_pool2d(self.c3(h), 2)
        return self.fc(h.flatten(1))


class Vol(nn.Module):
    """A grouped Conv3d with stride and per-dim padding."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), groups=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).mean((2, 3, 4)))


def _cnn():
    return _randomize_norms(CNN().double()).eval()


@pytest.mark.parametrize("contraction", ["auto", "gradients", "pairs"])
def test_cnn_bn_eval_groups_depthwise_padding_modes(contraction):
    m = _cnn()
    x1, x2 = _x(4, 3, 8, 8), _x(3, 3, 8, 8, seed=1)
    for mode in ("trace", "full"):
        for b in (x2, None):
            want = reference.ntk_oracle(m, x1, b, mode=mode)
            got = structured.structured_ntk(m, x1, b, mode=mode, contraction=contraction)
            assert_close_rel(got, want, rtol=1e-10, what=f"{contraction} {mode} {b is None}")


def test_batched_backward_and_loop_and_chunks_agree():
    m = _cnn()
    x1, x2 = _x(5, 3, 8, 8), _x(3, 3, 8, 8, seed=1)
    for mode in ("trace", "full"):
        for b in (x2, None):
            whole = structured.structured_ntk(m, x1, b, mode=mode)
            for kw in (dict(batched=False), dict(chunk_size=2), dict(chunk_size=1, batched=False),
                       dict(memory_budget=60_000)):
                info = {}
                got = structured.structured_ntk(m, x1, b, mode=mode, info=info, **kw)
                assert_close_rel(got, whole, rtol=1e-12, what=str(kw))
            assert info["chunk"] < 5  # the small budget did chunk
    # the result is a plain tensor, and the model's state is unchanged
    assert not whole.requires_grad


def test_conv1d_conv3d_and_linear_on_sequences():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2, padding_mode="replicate")
            self.lin = nn.Linear(3, 4)  # on (n, L, C): positions = L
            self.out = nn.Linear(4 * 4, 2)

        def forward(self, x):
            h = torch.tanh(self.c(x)).transpose(1, 2)
            return self.out(torch.tanh(self.lin(h)).flatten(1))

    _check(Seq().double(), _x(4, 2, 7), _x(2, 2, 7, seed=1))

    _check(Vol().double(), _x(3, 2, 3, 5, 3), _x(2, 2, 3, 5, 3, seed=1))


class SharedConv(nn.Module):
    """One Conv2d applied twice per forward (weight sharing: the per-example gradients of its two
    calls are summed), a lazyfast-style weight multiplier left out: plain convs with and without bias."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(3, 2, 3, stride=2, dilation=2, padding=2, bias=False)
        self.pw = nn.Conv2d(2, 2, 1, stride=2, padding=1, padding_mode="circular")  # pointwise: patches are a view
        self.fc = nn.Linear(2 * 3 * 3, 2)

    def forward(self, x):
        h = torch.tanh(self.c(torch.tanh(self.c(x))))
        return self.fc(self.pw(torch.relu(self.c2(h))).flatten(1))


@pytest.mark.parametrize("path", ["grouped", "patches"])
def test_conv_per_example_gradients_by_grouped_backward_and_by_patches(monkeypatch, path):
    """Both ways to a conv layer's per-example weight gradients (torch's conv weight-gradient kernel
    with the samples as groups, or patches and a batched product) agree with the oracle on every conv
    variant (stride, dilation, groups, depthwise, padding modes, 1-D / 3-D, shared calls), and the
    chosen way is the one that ran."""
    from lazyfast._engine.structured import factors
    from lazyfast._engine.structured.rules import conv
    if path == "grouped":
        monkeypatch.setattr(conv, "GROUPED_MAX_OUTPUTS", 10 ** 9)
        monkeypatch.setattr(conv, "GROUPED_MIN_POSITIONS", 1)
    else:
        monkeypatch.setattr(conv, "GROUPED_MAX_OUTPUTS", 0)
    calls = []
    real = factors._conv_jac
    monkeypatch.setattr(factors, "_conv_jac", lambda L, cap: calls.append(L) or real(L, cap))

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, padding_mode="replicate", groups=2)
            self.out = nn.Linear(4 * 4, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.c(x)).flatten(1))

    cases = [(_cnn(), (3, 8, 8)), (SharedConv().double(), (3, 8, 8)), (Seq().double(), (2, 7)),
             (Vol().double(), (2, 3, 5, 3))]
    for m, shape in cases:
        x1, x2 = _x(4, *shape), _x(3, *shape, seed=1)
        for mode in ("trace", "full"):
            for b in (x2, None):
                want = reference.ntk_oracle(m, x1, b, mode=mode)
                for order in ("gradients", "pairs"):
                    calls.clear()
                    got = structured.structured_ntk(m, x1, b, mode=mode, contraction=order)
                    assert_close_rel(got, want, rtol=1e-10, what=f"{type(m).__name__} {path} {mode} {order}")
                    convs = [L for L in calls if isinstance(L.module, nn.modules.conv._ConvNd)]
                    assert bool(convs) == (path == "grouped" and order == "gradients"), (type(m).__name__, path)


def test_conv_grouped_path_is_taken_for_few_outputs_at_many_positions():
    """The default thresholds: k·C_out/g ≤ 64 at ≥ 64 output positions."""
    from lazyfast._engine.structured.rules.conv import grouped_pays
    c = nn.Conv2d(8, 16, 3, padding=1)
    assert grouped_pays(c, torch.zeros(1, 2, 16, 8, 8))          # k·o = 16, 64 positions
    assert grouped_pays(c, torch.zeros(4, 2, 16, 8, 8))          # k·o = 64
    assert not grouped_pays(c, torch.zeros(5, 2, 16, 8, 8))      # k·o = 80
    assert not grouped_pays(c, torch.zeros(1, 2, 16, 7, 9))      # 63 positions
    dw = nn.Conv2d(16, 16, 3, groups=16)
    assert grouped_pays(dw, torch.zeros(10, 2, 16, 8, 8))        # depthwise: k·o = 10


@pytest.mark.parametrize("slice_numbers", [1, 7, 1 << 22])
def test_sliced_gradient_blocks_of_one_chunk_agree_with_the_oracle(monkeypatch, slice_numbers):
    """One chunk (x2 None): a linear layer's weight term is formed and contracted in slices over its
    input features (one slice of one feature, uneven slices, one whole slice), with a weight
    multiplier (lazyfast's _Dense on sequences), weight sharing, a bias-free layer and a kernel
    accumulated in float64 from a float32 model."""
    from lazyfast._engine.structured import contract as ct
    from lazyfast._engine.structured import schedule
    from lazyfast.models import _Dense
    monkeypatch.setattr(ct, "GRADIENT_SLICE_NUMBERS", slice_numbers)
    sliced = []
    real = ct._add_sliced
    monkeypatch.setattr(ct, "_add_sliced", lambda acc, L, u, d, mode: sliced.append(L) or real(acc, L, u, d, mode))

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = _Dense(5, 6, True, "ntk", dtype=D)
            self.b = nn.Linear(6, 6, bias=False).double()
            self.out = nn.Linear(6, 3).double()

        def forward(self, x):  # (n, L, 5)
            h = torch.tanh(self.a(x))
            h = torch.tanh(self.b(torch.tanh(self.b(h))))
            return self.out(h.mean(1))

    assert schedule.GRADIENT_SLICE_NUMBERS == 1 << 22
    m = Tok()
    x = _x(4, 3, 5)
    for mode in ("trace", "full"):
        sliced.clear()
        got = structured.structured_ntk(m, x, mode=mode, contraction="gradients")
        assert_close_rel(got, reference.ntk_oracle(m, x, mode=mode), rtol=1e-10, what=f"{mode} {slice_numbers}")
        assert len(sliced) == 2  # a, b (two calls, one layer); out (2-D input) is a hadamard_gram_sum layer
    m32 = Tok().float()
    m32.load_state_dict(m.state_dict())
    got = structured.structured_ntk(m32, x.float(), mode="full", contraction="gradients", out_dtype=torch.float64)
    assert got.dtype == torch.float64
    assert_close_rel(got, reference.ntk_oracle(m, x, mode="full"), rtol=1e-5, what="float32 -> float64")


def test_long_float32_grams_are_summed_in_float64_pieces():
    """A per-example-gradient Gram over a depth of millions (a deep network's gradient blocks) goes in
    float32 GEMM pieces summed in float64: within 1e-6 of the float64 Gram where one float32 GEMM
    is off by about 1e-4 on this machine's BLAS."""
    from lazyfast._engine.structured.contract import _gram_into
    a = (torch.randn(4, 1 << 21, dtype=D, generator=_g(0)) * 10 + 3.0).float()
    want = a.double() @ a.double().T
    for acc_dtype in (torch.float32, torch.float64):
        acc = torch.zeros(4, 4, dtype=acc_dtype)
        _gram_into(acc, a, a, alpha=0.5)
        assert float((acc.double() - 0.5 * want).abs().max() / (0.5 * want).abs().max()) < 1e-6


def test_mlp_sequential_with_and_without_bias():
    for bias in (True, False):
        m = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 6, bias=bias), nn.GELU(),
                          nn.Linear(6, 3, bias=bias)).double()
        _check(m, _x(5, 5), _x(4, 5, seed=1), impl="auto")
        _check(m, _x(5, 5), None, impl="auto")


def test_weight_sharing_frozen_and_raw_parameter():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)
            self.frozen = nn.Linear(4, 4)
            self.frozen.weight.requires_grad_(False)  # bias-only layer
            self.scale = nn.Parameter(torch.randn(4))  # raw parameter: the generic remainder

        def forward(self, x):
            h = torch.tanh(self.lin(x))
            # applied twice per forward; sin(scale) is no operator rule's slot: the generic remainder
            h = torch.tanh(self.lin(h) * torch.sin(self.scale))
            return self.head(self.frozen(h))

    m = Shared().double()
    info = {}
    got = structured.structured_ntk(m, _x(4, 4), mode="full", info=info)
    assert info["remainder"] == ["scale"]
    assert_close_rel(got, reference.ntk_oracle(m, _x(4, 4), mode="full"), rtol=1e-10)
    _check(m, _x(4, 4), _x(3, 4, seed=1), impl="auto")


def test_tied_and_foreign_parameter_uses_go_to_the_remainder():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.mix = nn.Linear(4, 4)

        def forward(self, idx):
            h = torch.tanh(self.mix(self.emb(idx)))  # (n, L, 4)
            return (h @ self.emb.weight.T).mean(1)[:, :3]  # the embedding reused as output head

    m = Tied().double()
    idx = torch.randint(0, 7, (4, 5), generator=_g(0))
    info = {}
    structured.structured_ntk(m, idx, info=info)
    assert info["remainder"] == ["emb.weight"]
    _check(m, idx, torch.randint(0, 7, (3, 5), generator=_g(1)))


def test_embedding_integer_inputs_padding_idx_layernorm():
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4, padding_idx=0)
            self.norm = nn.LayerNorm(4)
            self.out = nn.Linear(4, 2)

        def forward(self, idx):
            return self.out(self.norm(self.emb(idx))).sum(1)

    m = _randomize_norms(Tok().double())
    i1 = torch.randint(0, 9, (5, 6), generator=_g(0))
    i1[:, 0] = 0  # padding positions get no gradient
    i2 = torch.randint(0, 9, (3, 6), generator=_g(1))
    for contraction in ("gradients", "pairs", "matches"):
        for mode in ("trace", "full"):
            got = structured.structured_ntk(m, i1, i2, mode=mode, contraction=contraction)
            assert_close_rel(got, reference.ntk_oracle(m, i1, i2, mode=mode), rtol=1e-10)
    _check(m, i1, None, impl="auto")


class _Tokens(nn.Module):
    """An Embedding (padding_idx 0) looked up on the tokens and, shared, on the reversed tokens."""

    def __init__(self, vocab, twice=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, 3, padding_idx=0)
        self.out = nn.Linear(3, 2)
        self.twice = twice

    def forward(self, idx):
        h = self.emb(idx)
        if self.twice:
            h = h + 0.5 * self.emb(idx.flip(1))
        return self.out(torch.tanh(h)).sum(1)


def _embedding_cases():
    """(name, vocab, twice, x1, x2): padding, repeated tokens inside a sample, a token of x1 absent
    from x2, all tokens equal, a shared Embedding called twice."""
    i1 = torch.tensor([[1, 2, 2, 0, 5], [3, 3, 3, 1, 0], [4, 1, 2, 6, 6]])
    i2 = torch.tensor([[2, 2, 1, 0, 3], [0, 0, 1, 1, 2]])  # 4, 5 and 6 only in i1
    same = torch.full((4, 5), 3)
    return [("mixed", 7, False, i1, i2), ("mixed x2=None", 7, False, i1, None),
            ("all equal", 7, False, same, torch.full((3, 5), 3)), ("all equal x2=None", 7, False, same, None),
            ("shared", 7, True, i1, i2), ("shared x2=None", 7, True, i1, None),
            ("only padding", 7, False, torch.zeros(2, 5, dtype=torch.long), i2)]


@pytest.mark.parametrize("contraction", ["gradients", "pairs", "matches", "auto"])
def test_embedding_contraction_orders_agree_with_the_oracle(contraction):
    for name, vocab, twice, x1, x2 in _embedding_cases():
        m = _Tokens(vocab, twice).double()
        for mode in ("trace", "full"):
            got = structured.structured_ntk(m, x1, x2, mode=mode, contraction=contraction)
            assert_close_rel(got, reference.ntk_oracle(m, x1, x2, mode=mode), rtol=1e-10, what=f"{name} {mode}")


def test_embedding_matches_order_is_chunked_within_the_budget():
    """All tokens equal: every (sample, token) row of one chunk matches every row of the other; the
    "matches" order gives the same block in steps of one row pair (budget 1) as in one step."""
    emb = types.SimpleNamespace(module=nn.Embedding(4, 3, padding_idx=0))
    k, e = 2, 3
    for i1, i2 in ((torch.full((4, 5), 2), torch.full((3, 6), 2)), (torch.randint(0, 4, (4, 5), generator=_g(0)),) * 2):
        d1 = torch.randn(k, *i1.shape, e, dtype=D, generator=_g(1))
        d2 = d1 if i2 is i1 else torch.randn(k, *i2.shape, e, dtype=D, generator=_g(2))
        for mode in ("trace", "full"):
            r = k if mode == "full" else 1
            want = torch.zeros(i1.shape[0] * r, i2.shape[0] * r, dtype=D)
            contract._add_embedding(want, emb, i1, d1, i2, d2, mode, 1 << 30, "pairs")
            for budget in (1 << 30, 1):
                got = torch.zeros_like(want)
                contract._add_embedding(got, emb, i1, d1, i2, d2, mode, budget, "matches")
                assert_close_rel(got, want, rtol=1e-12, what=f"{mode} budget {budget}")


@pytest.mark.parametrize("tokens, order", [("random", "_add_matches"), ("positions", "_add_dense_gradients")])
def test_embedding_auto_order_follows_the_token_statistics(monkeypatch, tokens, order):
    """BERT-like chunks (16 sequences of 32 tokens, k = 10, 128 channels): random tokens of a
    vocabulary of 1000 rarely match and "auto" takes "matches"; position ids (every sample holds the
    same 32 tokens, so every sample pair has 32 matching rows) make the dense gradients cheaper.
    Both for the symmetric diagonal block (the same factors) and for two chunks."""
    ran = []
    for name in ("_add_matches", "_add_dense_gradients", "_add_position_pairs"):
        f = getattr(contract, name)
        monkeypatch.setattr(contract, name, lambda *a, _f=f, _n=name: (ran.append(_n), _f(*a)))
    emb = types.SimpleNamespace(module=nn.Embedding(1000, 128))
    if tokens == "random":
        idx = torch.randint(0, 1000, (16, 32), generator=_g(0))
    else:
        idx = torch.arange(32).repeat(16, 1)
    d = torch.randn(10, 16, 32, 128, generator=_g(1))
    other = torch.randint(0, 1000, (16, 32), generator=_g(2)) if tokens == "random" else idx.clone()
    for i2, d2 in ((idx, d), (other, d.clone())):
        for mode in ("trace", "full"):
            ran.clear()
            acc = torch.zeros(16 * (10 if mode == "full" else 1), 16 * (10 if mode == "full" else 1))
            contract._add_embedding(acc, emb, idx, d, i2, d2, mode, 1 << 27, "auto")
            assert ran == [order], (mode, i2 is idx)


def test_matches_is_an_embedding_order_other_layers_take_their_auto_order():
    m = _cnn()
    x1, x2 = _x(4, 3, 8, 8), _x(3, 3, 8, 8, seed=1)
    orders = {}
    for contraction in ("auto", "matches"):
        info = {}
        got = structured.structured_ntk(m, x1, x2, mode="full", contraction=contraction, info=info)
        assert_close_rel(got, reference.ntk_oracle(m, x1, x2, mode="full"), rtol=1e-10)
        orders[contraction] = info["contractions"]
    assert orders["matches"] == orders["auto"] and set(orders["auto"]) <= {"gradients", "pairs"}
    info = {}
    structured.structured_ntk(_Tokens(7).double(), torch.ones(2, 3, dtype=torch.long), contraction="matches",
                              info=info)
    assert info["contractions"][0] == "matches"


def test_groupnorm_instancenorm_and_bias_only_norm():
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.InstanceNorm2d(4, affine=True),
                      nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).double()
    _randomize_norms(m)
    with torch.no_grad():
        m[3].weight.normal_(1, 0.3)
        m[3].bias.normal_()
    m[1].weight.requires_grad_(False)
    _check(m, _x(3, 2, 6, 6), _x(2, 2, 6, 6, seed=1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer(batch_first):
    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.1, batch_first=batch_first)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.enc(x if batch_first else x.transpose(0, 1))
            return self.head((h if batch_first else h.transpose(0, 1)).mean(1))

    m = T().double().eval()
    info = {}
    structured.structured_ntk(m, _x(3, 4, 8), info=info)
    assert "LayerNorm" in info["layers"] and "_InProj" in info["layers"] and info["remainder"] == []
    _check(m, _x(3, 4, 8), _x(2, 4, 8, seed=1), impl="auto")
    assert "forward" not in m.enc.self_attn.__dict__  # the capture's attention shadow is gone


def test_attention_masks_need_weights_and_cross_attention():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, batch_first=True, norm_first=True)
            self.cross = nn.MultiheadAttention(8, 2)  # query != key: the remainder
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            pad[:, -1] = True
            causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
            h = self.enc(x, src_mask=causal, src_key_padding_mask=pad)
            t = h.transpose(0, 1)
            c, w = self.cross(t[:2], t, t, need_weights=True)
            return self.head(c.mean(0) + w.sum((1, 2))[:, None])

    m = Masked().double().eval()
    info = {}
    structured.structured_ntk(m, _x(3, 4, 8), info=info)
    assert sorted(info["remainder"]) == ["cross.in_proj_bias", "cross.in_proj_weight", "cross.out_proj.bias",
                                         "cross.out_proj.weight"]
    _check(m, _x(3, 4, 8), _x(2, 4, 8, seed=1), impl="structured")


class _Block(nn.Module):  # torchvision's BasicBlock at tiny width
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += idt
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (7×7 stem, max pool, [2, 2, 2, 2], in-place ReLU, BN) at width w."""

    def __init__(self, w=2, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        blocks, cin = [], w
        for i, c in enumerate((w, 2 * w, 4 * w, 8 * w)):
            for j in range(2):
                blocks.append(_Block(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layers(x)), 1))


def test_resnet18_batchnorm_eval_and_float32():
    m = _randomize_norms(ResNet18().double()).eval()
    x1, x2 = _x(3, 3, 16, 16), _x(2, 3, 16, 16, seed=1)
    info = {}
    structured.structured_ntk(m, x1, info=info)
    assert info["remainder"] == []
    _check(m, x1, x2, impl="auto")
    _check(m, x1, None, impl="auto", modes=("full",))
    m32 = ResNet18().float().eval()
    m32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in m.state_dict().items()})
    want = lazyfast.empirical_ntk(m, x1, mode="full")
    got = lazyfast.empirical_ntk(m32, x1.float(), mode="full")
    assert got.dtype == torch.float32
    assert_close_rel(got.double(), want, rtol=1e-5)


def _state(m):
    return ({k: v.clone() for k, v in m.state_dict().items()}, [mod.training for mod in m.modules()])


@pytest.mark.parametrize("impl", ["auto", "structured", "jacobian", "ntk_vp"])
def test_coupled_models_get_a_clear_error_and_keep_their_state(impl):
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).double().train()
    drop = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.2), nn.Linear(5, 2)).double().train()
    x = _x(4, 4)
    for m in (bn, drop):
        before = _state(m)
        with pytest.raises(ValueError, match="model.eval()"):
            lazyfast.empirical_ntk(m, x, implementation=impl)
        after = _state(m)
        assert before[1] == after[1]
        assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    bn.eval()  # eval mode: a supported model, and its buffers stay as they were
    before = _state(bn)
    _check(bn, x, None, impl=impl)
    after = _state(bn)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1] == after[1]
    emb = nn.Embedding(5, 3, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        lazyfast.empirical_ntk(emb, torch.zeros(2, 1, dtype=torch.long), implementation=impl)


def test_subclass_overriding_forward_and_hooks_follow_the_real_forward():
    class Twisted(TwoLayer):
        def forward(self, x):
            return super().forward(torch.sin(x)) * 2

    two = Twisted(3, 6, 2, activation="tanh", dtype=D)
    x = _x(4, 3)
    _check(two, x, None, impl="auto")
    with pytest.raises(ValueError, match="TwoLayer"):
        lazyfast.empirical_ntk(two, x, implementation="fused")

    class MyMLP(MLP):
        def forward(self, x):
            return super().forward(x) ** 2

    mlp = MyMLP(3, [5, 4], 2, activation="tanh", dtype=D)
    _check(mlp, x, None, impl="auto")
    plain = TwoLayer(3, 6, 2, activation="tanh", dtype=D)
    h = plain.hidden.register_forward_hook(lambda mod, inp, out: out * 3)
    _check(plain, x, None, impl="auto")
    h.remove()
    mlp2 = MLP(3, [5], 2, dtype=D)
    mlp2.layers[0].register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
    _check(mlp2, x, None, impl="auto")
    # with the hook gone, the fused kernel serves the exact TwoLayer again
    assert lazyfast._engine.two_layer.fused_applicable(plain)
    assert not lazyfast._engine.two_layer.fused_applicable(two)


def test_empty_batches_take_k_from_the_model():
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    e, x = torch.zeros(0, 4, dtype=D), _x(3, 4)
    for impl in ("auto", "structured", "jacobian", "ntk_vp"):
        assert lazyfast.empirical_ntk(m, e, mode="full", implementation=impl).shape == (0, 0, 2, 2)
        assert lazyfast.empirical_ntk(m, x, e, mode="full", implementation=impl).shape == (3, 0, 2, 2)
    t = {n: torch.zeros((5,) + p.shape, dtype=D) for n, p in m.named_parameters()}
    assert lazyfast.jvp(m, e, t).shape == (5, 0, 2)
    g = lazyfast.vjp(m, e, torch.zeros(0, 2, dtype=D))
    assert all(torch.equal(g[n], torch.zeros_like(p)) for n, p in m.named_parameters())
    assert lazyfast.ntk_vp(m, e, torch.zeros(0, 2, dtype=D)).shape == (0, 2)
    assert lazyfast.ntk_vp(m, x, torch.zeros(0, 2, dtype=D), e).shape == (3, 2)
    mlp = MLP(4, [3], 2, dtype=D)
    assert lazyfast.ntk_vp(mlp, e, torch.zeros(0, 2, dtype=D)).shape == (0, 2)
    assert lazyfast.vjp(mlp, e, torch.zeros(0, 2, dtype=D))["layers.0.weight"].shape == (3, 4)


def test_mlp_result_is_a_plain_tensor_and_auto_routes_to_structured():
    m = MLP(4, [6, 5], 3, dtype=D)
    x = _x(7, 4)
    K = lazyfast.empirical_ntk(m, x, memory_budget=4096)
    assert not K.requires_grad and K.grad_fn is None
    assert_close_rel(K, reference.ntk_oracle(m, x), rtol=1e-10)
    info = {}
    assert lazyfast.ntk.choose_implementation(m, x, info=info)[0] == "structured"
    assert lazyfast.ntk.choose_implementation(TwoLayer(4, 5, dtype=D), x)[0] == "fused"


def test_batched_backward_falls_back_to_a_loop_where_batching_fails(monkeypatch):
    m = _cnn()
    x = _x(3, 3, 8, 8)
    want = structured.structured_ntk(m, x, mode="full")
    real, calls = torch.autograd.grad, []

    def grad(*args, is_grads_batched=False, **kw):
        calls.append(is_grads_batched)
        if is_grads_batched:
            raise RuntimeError("no batching rule (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    got = structured.structured_ntk(m, x, mode="full")
    assert calls[0] is True and calls.count(False) == 3  # tried batched, then one pass per output
    assert_close_rel(got, want, rtol=1e-12)


def test_panels_of_held_factors_with_streamed_chunks_agree():
    # a budget that holds the factors of only part of x1: x1 is taken in panels, x2's chunks are
    # recaptured once per panel (x2=None: only those after the panel); the kernel is unchanged
    m = _cnn()
    x1, x2 = _x(9, 3, 8, 8), _x(7, 3, 8, 8, seed=1)
    plan = structured.make_plan(m, x1)
    held, trans = structured._factor_numel(plan)
    for mode in ("trace", "full"):
        for b in (x2, None):
            want = reference.ntk_oracle(m, x1, b, mode=mode)
            for budget in (8 * (4 * held + 2 * (held + trans)), 8 * (2 * (held + trans))):
                info = {}
                got = structured.structured_ntk(m, x1, b, mode=mode, memory_budget=budget, info=info)
                assert info["panel"] < x1.shape[0] and info["panel"] % info["chunk"] == 0, info
                assert_close_rel(got, want, rtol=1e-10, what=f"{mode} {b is None} {budget} {info}")


@pytest.mark.parametrize("numbers", [1, 17000, 10 ** 12])
def test_held_chunks_captured_in_smaller_groups_agree_with_the_oracle(monkeypatch, numbers):
    """Chunks whose factors are held (several chunks, x2 given or not) are captured a few samples
    at a time and joined: every factor kind (gradient blocks, position pairs, hadamard stacks,
    embedding indices) joins in sample order."""
    from lazyfast._engine.structured import capture as cap_mod
    from lazyfast._engine.structured import factors
    from lazyfast._engine.structured import schedule
    monkeypatch.setattr(schedule, "CAPTURE_NUMBERS", numbers)
    sizes = []
    real = cap_mod._capture
    monkeypatch.setattr(factors, "_capture", lambda m, p, x, b: sizes.append(x.shape[0]) or real(m, p, x, b))

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4)
            self.mix = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 2)

        def forward(self, idx):
            h = self.norm(torch.tanh(self.mix(self.emb(idx))))
            return self.head(h.mean(1))

    cases = [(_cnn(), lambda n, s: _x(n, 3, 8, 8, seed=s)),
             (Tok().double(), lambda n, s: torch.randint(0, 9, (n, 5), generator=_g(s)))]
    for m, make in cases:
        x1, x2 = make(7, 0), make(5, 1)
        for mode in ("trace", "full"):
            for b in (x2, None):
                for order in ("gradients", "pairs"):
                    sizes.clear()
                    got = structured.structured_ntk(m, x1, b, mode=mode, chunk_size=4, contraction=order)
                    assert_close_rel(got, reference.ntk_oracle(m, x1, b, mode=mode), rtol=1e-10,
                                     what=f"{type(m).__name__} {mode} {order} {numbers}")
                    if type(m) is CNN:  # 7991 transient numbers per sample: groups of 1, 2 (17000) or 4 (the chunk)
                        assert max(sizes) == {1: 1, 17000: 2, 10 ** 12: 4}[numbers], sizes
                    if numbers == 1:
                        assert len(sizes) >= 7 + (5 if b is not None else 0)


def test_schedule_prefers_fewer_recaptures_within_the_budget():
    m = _cnn()
    plan = structured.make_plan(m, _x(1, 3, 8, 8))
    held, trans = structured._factor_numel(plan)
    big = structured._schedule(plan, 50, 50, True, 10**9, 50, "trace")
    assert big == (50, 50)  # everything fits: one chunk, nothing recaptured
    c, panel = structured._schedule(plan, 50, 50, True, 20 * held + 4 * (held + trans), 50, "trace")
    assert c < 50 and c <= panel < 50
    held2, trans2 = structured._factor_numel(plan)  # the orders the schedule set
    assert panel * held2 + c * (held2 + trans2) <= 20 * held + 4 * (held + trans)


def test_schedule_is_kept_per_call_size_and_reapplied_to_later_copies(monkeypatch):
    """The scheduler's search runs once per (plan, call size, budget, mode); a later call's copy of
    the same plan gets the same chunk, panel and orders; another size, or a revised plan, searches again."""
    from lazyfast._engine.structured import schedule
    from lazyfast._engine.structured.plan import PlanMismatch, revise_plan
    searches = []
    real = schedule._choose_schedule
    monkeypatch.setattr(schedule, "_choose_schedule", lambda *a: searches.append(a[1:]) or real(*a))
    m = _cnn()
    x = _x(6, 3, 8, 8)
    p1 = structured.make_plan(m, x)
    first = schedule._schedule(p1, 6, 6, True, 10**9, 6, "full", "pairs")
    orders = [L.contraction for L in p1.layers]
    p2 = structured.make_plan(m, x)
    for L in p2.layers:
        L.contraction = None
    assert schedule._schedule(p2, 6, 6, True, 10**9, 6, "full", "pairs") == first
    assert [L.contraction for L in p2.layers] == orders and len(searches) == 1
    schedule._schedule(p2, 6, 6, True, 10**9, 6, "full", "gradients")
    schedule._schedule(p2, 5, 6, False, 10**9, 6, "full", "pairs")
    assert len(searches) == 3
    revised = revise_plan(p2, PlanMismatch("test", drop={id(p2.layers[0].module)}))
    assert revised.schedules == {}
    schedule._schedule(revised, 6, 6, True, 10**9, 6, "full", "pairs")
    assert len(searches) == 4
    # and the kernel of a call that reuses a kept schedule is exact
    for _ in range(2):
        assert_close_rel(structured.structured_ntk(m, x, mode="full"), reference.ntk_oracle(m, x, mode="full"),
                         rtol=1e-10)


def test_plan_is_reused_until_the_model_changes():
    m = _cnn()
    x = _x(4, 3, 8, 8)
    p1 = structured.make_plan(m, x)
    p2 = structured.make_plan(m, x)
    assert p1 is not p2 and p1.layers[0] is not p2.layers[0]  # copies: orders are per call
    assert [L.module for L in p1.layers] == [L.module for L in p2.layers]
    assert structured.plan_fingerprint(m, x) == structured.plan_fingerprint(m, x[:1])
    before = structured.plan_fingerprint(m, x)
    # every change a plan depends on changes the fingerprint, and the kernel follows the model
    h = m.c3.register_forward_hook(lambda mod, a, out: 2 * out)
    assert structured.plan_fingerprint(m, x) != before
    _check(m, x, modes=("trace",), impl="auto")
    h.remove()
    assert structured.plan_fingerprint(m, x) == before
    m.c2.weight.requires_grad_(False)
    assert structured.plan_fingerprint(m, x) != before
    _check(m, x, modes=("trace",), impl="auto")
    m.c2.weight.requires_grad_(True)
    m.c2.stride = (1, 1)
    m.fc = nn.Linear(6 * 4 * 4, 3).double()
    _check(m, x, modes=("trace", "full"), impl="auto")
    assert structured.plan_fingerprint(m, x) != structured.plan_fingerprint(m, _x(4, 3, 16, 16))
    m.train()
    assert structured.plan_fingerprint(m, x) != before


def test_a_model_that_is_its_own_layer_is_not_kept_alive_by_the_plan_cache():
    import gc
    import weakref

    lin = nn.Linear(3, 2).double()
    _check(lin, _x(4, 3), impl="structured")
    ref = weakref.ref(lin)
    seq = nn.Sequential(nn.Linear(3, 2)).double()
    _check(seq, _x(4, 3), impl="structured")
    ref2 = weakref.ref(seq)
    del lin, seq
    gc.collect()
    assert ref() is None and ref2() is None


def test_plan_follows_a_list_attribute_that_reroutes_the_forward():
    class Route(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)
            self.order = ["a", "b"]

        def forward(self, x):
            for name in self.order:
                x = torch.tanh(getattr(self, name)(x))
            return self.head(x)

    m = Route().double()
    x = _x(4, 3)
    _check(m, x, impl="auto")
    before = structured.plan_fingerprint(m, x)
    m.order = ["a", "a", "b"]  # `a` now runs twice: a new plan, still exact
    assert structured.plan_fingerprint(m, x) != before
    _check(m, x, impl="auto")


def test_engine_modules_own_one_thing_each_and_import_in_one_direction():
    """The house: each module of the structured engine says in its first docstring line what it owns,
    imports at module level only (no import inside a function), and the imports among them form a
    DAG. The package re-exports no module global a test or benchmark patches (``_VERIFY``,
    ``ParamUses``): a patch of the package would then change nothing; it must fail instead."""
    pkg = pathlib.Path(structured.__file__).parent
    names = {}
    for p in pkg.rglob("*.py"):
        parts = ("lazyfast._engine.structured",) + p.relative_to(pkg).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    edges = {}
    for name, p in names.items():
        tree = ast.parse(p.read_text())
        doc = ast.get_docstring(tree)
        assert doc and doc.splitlines()[0].strip(), f"{p} has no first docstring line"
        inner = [n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not inner, f"{p}: imports inside functions at lines {inner}"
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        # a module's own packages are not its dependencies (a package imports its parts)
        edges[name] = {d for d in deps if d in names and d != name and not name.startswith(d + ".")}
    done, stack = set(), []

    def visit(m):
        assert m not in stack, "import cycle: " + " -> ".join(stack[stack.index(m):] + [m])
        if m in done:
            return
        stack.append(m)
        for d in edges[m]:
            visit(d)
        stack.pop()
        done.add(m)

    for m in names:
        visit(m)
    assert not hasattr(structured, "_VERIFY") and not hasattr(structured, "ParamUses")
