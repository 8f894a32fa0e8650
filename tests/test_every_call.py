"""Exact on every call (issue 18, docs/engine.md "Exact on every call"): models built to break a
plan probed on copies of one sample, or a cached plan, get the exact kernel (float64, ≤ 1e-10
against autograd through the real model on the real batch) or a clear error; the self-check
catches what the engine would otherwise return wrong; a call leaves the model as it found it.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.utils.checkpoint as ckpt
from torch import nn

import lazyfast
from lazyfast import selfcheck
from lazyfast._engine import structured
from lazyfast._engine.structured import capture as structured_capture, plan as structured_plan
from lazyfast._engine.uses import ParamUses

D = torch.float64
IMPLS = ("auto", "structured", "jacobian")


def batch_oracle(model, x, mode="trace"):
    """Θ of the batched function: one forward of the real model on the whole batch, one autograd
    backward per output entry (sees every parameter, alias, hook and branch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    n = x.shape[0]
    out = out.reshape(n, -1)
    k = out.shape[1]
    rows = []
    for i in range(n):
        for a in range(k):
            g = torch.autograd.grad(out[i, a], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(g, params)]))
    J = torch.stack(rows)
    K = (J @ J.T).reshape(n, k, n, k).permute(0, 2, 1, 3)
    return K if mode == "full" else torch.diagonal(K, dim1=2, dim2=3).mean(-1)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def X(n=6, d=3, seed=0):
    return torch.randn(n, d, dtype=D, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the seven silent cases
class _FcOut(nn.Module):
    """fc: Linear(3, 4), out: Linear(4, 2): the layers of the small test models below."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(3, 4), nn.Linear(4, 2)


class PreHookUsesWeight(_FcOut):
    """1: a forward pre-hook that reads the layer's own weight (outside the layer's own forward)."""

    def __init__(self):
        super().__init__()
        self.fc.register_forward_pre_hook(lambda m, a: (a[0] * m.weight.sum(),))

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


class InPlaceForSome(_FcOut):
    """2: an in-place op on a Linear output that runs only for some inputs: copies of x[0] (the
    probe) do not trigger it, the real batch does."""

    def forward(self, x):
        h = self.fc(x)
        if bool((x[:, 0] > 0).any()):
            h.mul_(2.0)
        return self.out(torch.tanh(h))


class DirectUseBehindBranch(_FcOut):
    """3: a direct use of a covered weight behind a branch on batch values."""

    def forward(self, x):
        h = self.fc(x)
        if bool((x[:, 0] > 0).any()):
            h = h + x @ self.fc.weight.T
        return self.out(torch.tanh(h))


STATE = types.SimpleNamespace(flag=False)
GLOBAL_FLAG = {"on": False}


class StaleBranch(nn.Module):
    """4: the forward branches on state the plan's fingerprint does not see (a SimpleNamespace
    attribute, a module-level global); the branch flips after the first call."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)
        self.state = STATE

    def forward(self, x):
        h = self.b(x) if self.state.flag else self.a(x)
        if GLOBAL_FLAG["on"]:
            h = h + x @ self.a.weight.T
        return self.out(torch.tanh(h))


class ListAlias(_FcOut):
    """5a: a parameter reached through a Python list made in __init__."""

    def __init__(self):
        super().__init__()
        self.ws = [self.fc.weight]

    def forward(self, x):
        return self.out(torch.tanh(x @ self.ws[0].T + self.fc.bias))


class ViewAlias(nn.Module):
    """5b: a view (.T) of a parameter made in __init__."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(3, 4, dtype=D), nn.Linear(4, 2, dtype=D)
        self.wT = self.fc.weight.T

    def forward(self, x):
        return self.out(torch.tanh(x @ self.wT + self.fc(x)))


class MidViewAlias(nn.Module):
    """5c: a view into the middle of a parameter's storage (rows 1: of a weight) made in __init__:
    its first element is inside the storage, not at its start (the watchers' address pre-filter)."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(3, 4, dtype=D), nn.Linear(3, 2, dtype=D)
        self.rows = self.fc.weight[1:]

    def forward(self, x):
        return self.out(torch.tanh(x @ self.rows.T + self.fc(x)[:, 1:]))


class BatchLast(nn.Module):
    """6: an output whose batch axis is not first, (k, n)."""

    def __init__(self, k=2):
        super().__init__()
        self.fc = nn.Linear(3, k)

    def forward(self, x):
        return self.fc(x).T


class Stateful(nn.Module):
    """7: a forward that advances its own state (self.step += 1) and picks a layer by it."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3, 2), nn.Linear(3, 2)])
        self.step = 0

    def forward(self, x):
        layer = self.layers[self.step % 2]
        self.step += 1
        return layer(x)


def _mixed_batch():
    x = X(6)
    x[:, 0] = -x[:, 0].abs()
    x[3, 0] = 1.0  # only sample 3 triggers the branch; the probe copies sample 0
    return x


@pytest.mark.parametrize("impl", ("auto", "structured"))
@pytest.mark.parametrize("mode", ("trace", "full"))
def test_pre_hook_reading_the_weight_is_exact(impl, mode):
    torch.manual_seed(0)
    m = PreHookUsesWeight().double()
    x = X()
    K = lazyfast.empirical_ntk(m, x, mode=mode, implementation=impl, check=False)
    assert rel(K, batch_oracle(m, x, mode)) < 1e-10


@pytest.mark.parametrize("impl", ("auto", "structured"))
def test_in_place_on_some_inputs_is_exact(impl):
    torch.manual_seed(0)
    m = InPlaceForSome().double()
    x = _mixed_batch()
    K = lazyfast.empirical_ntk(m, x, implementation=impl, check=False)
    assert rel(K, batch_oracle(m, x)) < 1e-10


def test_in_place_on_some_inputs_jacobian_is_a_clear_error():
    m = InPlaceForSome().double()
    with pytest.raises(ValueError, match="branches on the values"):
        lazyfast.empirical_ntk(m, _mixed_batch(), implementation="jacobian")


@pytest.mark.parametrize("impl", IMPLS)
def test_direct_use_behind_a_branch_exact_or_clear(impl):
    """The real batch takes the branch: the covered weight is seen used outside its layer and goes
    to the generic remainder, whose per-sample vmap cannot follow a value branch: the remainder takes
    NTK-vector products instead and the kernel is exact (the whole-model Jacobian path gives a clear
    error; never the old silently wrong kernel). Without the branch taken, the kernel is exact."""
    torch.manual_seed(0)
    m = DirectUseBehindBranch().double()
    if impl == "jacobian":
        with pytest.raises(ValueError, match="branches on the values"):
            lazyfast.empirical_ntk(m, _mixed_batch(), implementation=impl)
    else:  # the remainder that per-sample vmap cannot run takes NTK-vector products: exact
        xb = _mixed_batch()
        assert rel(lazyfast.empirical_ntk(m, xb, implementation=impl), batch_oracle(m, xb)) < 1e-10
    x = _mixed_batch()
    x[3, 0] = -1.0
    m = DirectUseBehindBranch().double()  # a fresh model: the first one's revised plan is kept
    if impl == "jacobian":
        with pytest.raises(ValueError, match="branches on the values"):  # vmap cannot run the branch at all
            lazyfast.empirical_ntk(m, x, implementation=impl)
    else:
        assert rel(lazyfast.empirical_ntk(m, x, implementation=impl), batch_oracle(m, x)) < 1e-10


@pytest.mark.parametrize("impl", IMPLS)
def test_stale_cached_plan_is_exact(impl):
    torch.manual_seed(0)
    m = StaleBranch().double()
    x = X()
    try:
        STATE.flag, GLOBAL_FLAG["on"] = False, False
        assert rel(lazyfast.empirical_ntk(m, x, implementation=impl), batch_oracle(m, x)) < 1e-10
        STATE.flag = True  # not in the fingerprint: the cached plan is stale
        assert rel(lazyfast.empirical_ntk(m, x, implementation=impl), batch_oracle(m, x)) < 1e-10
        GLOBAL_FLAG["on"] = True  # a.weight used directly, but a no longer runs
        assert rel(lazyfast.empirical_ntk(m, x, implementation=impl), batch_oracle(m, x)) < 1e-10
        STATE.flag = False  # a runs again and its weight is also used outside it
        assert rel(lazyfast.empirical_ntk(m, x, implementation=impl), batch_oracle(m, x)) < 1e-10
    finally:
        STATE.flag, GLOBAL_FLAG["on"] = False, False


def test_revised_plan_is_cached_and_reported():
    torch.manual_seed(0)
    m = StaleBranch().double()
    x = X()
    try:
        lazyfast.empirical_ntk(m, x, implementation="structured")
        GLOBAL_FLAG["on"] = True
        info = {}
        K = structured.structured_ntk(m, x, info=info)
        assert info.get("revisions") and "a.weight" in info["remainder"]
        assert rel(K, batch_oracle(m, x)) < 1e-10
        info2 = {}
        structured.structured_ntk(m, x, info=info2)
        assert not info2.get("revisions")  # the revised plan was kept
    finally:
        GLOBAL_FLAG["on"] = False


@pytest.mark.parametrize("cls", (ListAlias, ViewAlias, MidViewAlias))
@pytest.mark.parametrize("impl", IMPLS + ("ntk_vp",))
def test_alias_is_refused(cls, impl):
    torch.manual_seed(0)
    m = cls().double()
    with pytest.raises(ValueError, match="alias made before the call"):
        lazyfast.empirical_ntk(m, X(), implementation=impl)


@pytest.mark.parametrize("fn", ("jvp", "vjp", "ntk_vp"))
def test_alias_is_refused_by_products(fn):
    torch.manual_seed(0)
    m = ListAlias().double()
    x = X()
    with pytest.raises(ValueError, match="alias made before the call"):
        if fn == "jvp":
            lazyfast.jvp(m, x, {n: torch.randn((1,) + p.shape, dtype=D) for n, p in m.named_parameters()})
        elif fn == "vjp":
            lazyfast.vjp(m, x, torch.randn(6, 2, dtype=D))
        else:
            lazyfast.ntk_vp(m, x, torch.randn(6, 2, dtype=D))


@pytest.mark.parametrize("k", (2, 6))  # k = n: the shape alone cannot tell
@pytest.mark.parametrize("impl", IMPLS)
def test_batch_axis_not_first_is_refused(k, impl):
    m = BatchLast(k).double()
    with pytest.raises(ValueError, match="first axis must be the batch axis"):
        lazyfast.empirical_ntk(m, X(6), implementation=impl)


def test_batch_axis_fixed_with_output_fn():
    torch.manual_seed(0)
    m = BatchLast(2).double()
    x = X(6)
    K = lazyfast.empirical_ntk(m, x, output_fn=lambda o: o.T)
    ref = lazyfast.empirical_ntk(m.fc, x)
    assert rel(K, ref) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_stateful_forward_is_a_clear_error_and_state_restored(impl):
    m = Stateful().double()
    with pytest.raises(ValueError, match=r"changed its state \(step: 0 -> "):
        lazyfast.empirical_ntk(m, X(), implementation=impl)
    assert m.step == 0


# ----------------------------------------------------------------------------- unclear errors made clear
class NoGradLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x)
        return self.b(torch.tanh(h))


class Reentrant(nn.Module):
    def __init__(self, reentrant=True):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)
        self.reentrant = reentrant

    def forward(self, x):
        return self.b(ckpt.checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=self.reentrant))


class Recurrent(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.r, self.o = cls(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.o(self.r(x)[0][:, -1])


@pytest.mark.parametrize("impl", ("auto", "structured"))
def test_layer_under_no_grad_is_a_clear_error(impl):
    with pytest.raises(ValueError, match="ran with gradients off"):
        lazyfast.empirical_ntk(NoGradLayer().double(), X(), implementation=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_reentrant_checkpoint_is_a_clear_error(impl):
    with pytest.raises(ValueError, match="use_reentrant"):
        lazyfast.empirical_ntk(Reentrant().double(), X(), implementation=impl)


def test_non_reentrant_checkpoint_is_exact():
    torch.manual_seed(0)
    m = Reentrant(False).double()
    x = X()
    assert rel(lazyfast.empirical_ntk(m, x), batch_oracle(m, x)) < 1e-10


@pytest.mark.parametrize("cls", (nn.GRU, nn.LSTM))
@pytest.mark.parametrize("impl", IMPLS)
def test_recurrent_layers_exact_or_a_clear_error(cls, impl):
    """Per-sample vmap cannot batch nn.GRU / nn.LSTM: the whole-model generic path (and auto, which
    routes this model there) gives a clear error; the structured engine's remainder takes NTK-vector
    products over the real batch and is exact."""
    m = Recurrent(cls).double().eval()
    x = torch.randn(4, 5, 3, dtype=D)
    if impl == "structured":
        assert rel(lazyfast.empirical_ntk(m, x, implementation=impl), batch_oracle(m, x)) < 1e-10
    else:
        with pytest.raises(ValueError, match="recurrent layers"):
            lazyfast.empirical_ntk(m, x, implementation=impl)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x), x


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        return {"logits": self.a(x), "hidden": x}


class AttrOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        return types.SimpleNamespace(logits=self.a(x))


@pytest.mark.parametrize("cls,sel", ((TupleOut, 0), (DictOut, "logits"), (AttrOut, "logits")))
def test_structured_outputs_need_output_fn(cls, sel):
    torch.manual_seed(0)
    m = cls().double()
    x = X()
    with pytest.raises(TypeError, match="output_fn="):
        lazyfast.empirical_ntk(m, x)
    for impl in IMPLS:
        K = lazyfast.empirical_ntk(m, x, output_fn=sel, implementation=impl)
        assert rel(K, lazyfast.empirical_ntk(m.a, x)) < 1e-12
    g = lazyfast.vjp(m, x, torch.ones(6, 2, dtype=D), output_fn=sel)
    assert set(g) == {"a.weight", "a.bias"}  # the model's own parameter names
    v = lazyfast.ntk_vp(m, x, torch.ones(6, 2, dtype=D), output_fn=sel)
    assert v.shape == (6, 2)


def test_output_fn_bad_values():
    m = DictOut().double()
    with pytest.raises(ValueError, match="output_fn='nope'"):
        lazyfast.empirical_ntk(m, X(), output_fn="nope")
    with pytest.raises(TypeError, match="output_fn must be"):
        lazyfast.empirical_ntk(m, X(), output_fn=1.5)


def test_compiled_model_is_unwrapped():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    cm = torch.compile(m)
    x = X()
    ref = batch_oracle(m, x)
    for impl in IMPLS:
        assert rel(lazyfast.empirical_ntk(cm, x, implementation=impl), ref) < 1e-10


def test_wrong_input_shape_quotes_the_users_shape():
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match=r"x1 \(shape \(5, 7\)"):
        lazyfast.empirical_ntk(m, torch.randn(5, 7, dtype=D))
    with pytest.raises(ValueError, match=r"x \(shape \(5, 7\)"):
        lazyfast.vjp(m, torch.randn(5, 7, dtype=D), torch.zeros(5, 2, dtype=D))


def test_out_of_range_token_ids_are_a_clear_error():
    m = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).double()
    ids = torch.randint(0, 10, (5, 3))
    ids[2, 1] = 13  # sample 2 only: the probe (sample 0) passes, the real batch does not
    for impl in IMPLS:
        with pytest.raises(ValueError, match=r"values in \[\d+, 13\].*token ids must lie in"):
            lazyfast.empirical_ntk(m, ids, implementation=impl)


class SeqOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.o = nn.Embedding(10, 4), nn.Linear(4, 10)

    def forward(self, x):
        return self.o(self.e(x))


def test_three_dim_output_says_what_to_pass():
    m = SeqOut().double()
    ids = torch.randint(0, 10, (5, 3))
    with pytest.raises(ValueError, match=r"outputs \(n,\) or \(n, k\).*output_fn="):
        lazyfast.empirical_ntk(m, ids)
    K = lazyfast.empirical_ntk(m, ids, output_fn=lambda o: o[:, -1])
    assert K.shape == (5, 5)


# ----------------------------------------------------------------------------- state left as found
class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.calls = 0
        self.log = []

    def forward(self, x):
        self.calls += 1
        self.log.append(x.shape[0])
        return self.a(x)


def test_plain_attributes_are_restored():
    m = CountsCalls().double()
    with pytest.raises(ValueError, match=r"calls: 0 -> .*log: \[\] -> "):
        lazyfast.empirical_ntk(m, X())
    assert m.calls == 0 and m.log == []


# ----------------------------------------------------------------------------- the self-check
def _old_engine(monkeypatch):
    """The engine without the per-call verification (what main did before): the plan is trusted.
    Patched where it is read: the capture's module."""
    monkeypatch.setattr(structured_capture, "_VERIFY", False)


@pytest.mark.parametrize("case", ("prehook", "branch_stale"))
def test_self_check_catches_what_an_unverified_plan_gets_wrong(case, monkeypatch):
    torch.manual_seed(0)
    if case == "prehook":
        m, x = PreHookUsesWeight().double(), X()
    else:
        m, x = StaleBranch().double(), X()
        lazyfast.empirical_ntk(m, x, implementation="structured", check=False)
    try:
        if case == "branch_stale":
            GLOBAL_FLAG["on"] = True
        _old_engine(monkeypatch)
        # probe-time detection still works for the pre-hook, so emulate the old probe too (the
        # probe reads ParamUses in the plan's module)
        if case == "prehook":
            monkeypatch.setattr(structured_plan, "ParamUses", _BlindUses)
        K = lazyfast.empirical_ntk(m, x, implementation="structured", check=False)
        assert rel(K, batch_oracle(m, x)) > 1e-3  # the unverified kernel is wrong ...
        with pytest.raises(selfcheck.SelfCheckError, match="self-check failed"):
            selfcheck.self_check(m, x, None, K, mode="trace", k=2)  # ... and the check says so
        with pytest.raises(selfcheck.SelfCheckError):
            lazyfast.empirical_ntk(m, x, implementation="structured", check=True)
    finally:
        GLOBAL_FLAG["on"] = False


class _BlindUses(ParamUses):
    def _arg(self, t):
        return None


@pytest.mark.parametrize("mode", ("trace", "full"))
@pytest.mark.parametrize("same", (True, False))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_self_check_passes_on_exact_kernels(mode, same, dtype):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x1 = torch.randn(7, 3, dtype=dtype)
    x2 = None if same else torch.randn(5, 3, dtype=dtype)
    K = lazyfast.empirical_ntk(m, x1, x2, mode=mode, check=False)
    r = selfcheck.self_check(m, x1, x2, K, mode=mode, k=3)
    assert r["passed"] and r["error"] <= r["tolerance"]
    bad = K.clone()
    bad[0, 0] *= 1.05  # 5 % on one sampled entry
    if 0 in (r["samples"] if same else r["samples"][0]) and (same or 0 in r["samples"][1]):
        with pytest.raises(selfcheck.SelfCheckError):
            selfcheck.self_check(m, x1, x2, bad, mode=mode, k=3)


def test_self_check_scaled_kernel_fails():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = X(9)
    K = lazyfast.empirical_ntk(m, x, check=False)
    with pytest.raises(selfcheck.SelfCheckError, match="implementation='structured'"):
        selfcheck.self_check(m, x, None, 1.01 * K, mode="trace", k=2, implementation="structured")


def test_self_check_auto_cost_rule_and_bad_value():
    f = selfcheck.check_cost_fraction
    assert f(400, None, 10, "trace", forward_flops=1e8, n_params=1e5) <= selfcheck.AUTO_MAX_FRACTION
    assert f(8, None, 10, "trace", forward_flops=1e8, n_params=1e5) > selfcheck.AUTO_MAX_FRACTION
    assert f(40, None, 10, "full", forward_flops=1e8, n_params=1e5) <= selfcheck.AUTO_MAX_FRACTION
    # memory-bound parameter work dominates for a few samples of a dense net
    assert f(64, None, 1, "trace", n_params=1e6) > f(64, None, 1, "trace", forward_flops=1e9, n_params=1e6)
    m = nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match="check must be"):
        lazyfast.empirical_ntk(m, X(), check="yes")


def test_self_check_leaves_rng_and_model_unchanged():
    torch.manual_seed(123)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = X(50)
    before = torch.get_rng_state()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    lazyfast.empirical_ntk(m, x, check=True)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA / without a GPU")
@pytest.mark.parametrize("ctor", (lambda: lazyfast.TwoLayer(3, 8, device="cuda"),
                                  lambda: lazyfast.MLP(3, [4], device="cuda")))
def test_cuda_device_without_cuda_is_a_clear_error(ctor):
    with pytest.raises(ValueError, match="device='cuda'"):
        ctor()


class BranchInLaterChunk(_FcOut):
    """An in-place change of a Linear's output that runs only for a chunk holding a sample with
    x[:, 1] > 2 (per sample, so the function is each sample's own): with small chunks the probe
    and the first chunks agree with the plan and a later one does not; the kernel restarts with
    the output cloned."""

    def forward(self, x):
        h = self.fc(x)
        mask = x[:, 1] > 2.0
        if bool(mask.any()):
            h[mask] *= 2.0
        return self.out(torch.tanh(h))


class CallsForwardDirectly(_FcOut):
    """A rule layer's forward called directly (bypassing __call__ and its hooks) and again normally."""

    def forward(self, x):
        return self.out(torch.tanh(self.fc.forward(x)) + torch.sin(self.fc(x)))


@pytest.mark.parametrize("mode", ("trace", "full"))
@pytest.mark.parametrize("same", (True, False))
def test_mismatch_in_a_later_chunk_restarts_exactly(mode, same):
    torch.manual_seed(0)
    m = BranchInLaterChunk().double()
    x1 = X(9)
    x1[:, 1] = x1[:, 1].clamp(max=1.0)
    x1[7, 1] = 3.0  # only sample 7 (the last chunks) uses fc.weight directly
    x2 = None if same else X(5, seed=3)
    info = {}
    K = structured.structured_ntk(m, x1, x2, mode=mode, chunk_size=2, info=info)
    if same:
        ref = batch_oracle(m, x1, mode)
    else:
        full = batch_oracle(m, torch.cat([x1, x2]), mode)
        ref = full[:9, 9:]
    assert rel(K, ref) < 1e-10
    assert info["revisions"] and "changed in place" in info["revisions"][0]


def test_direct_forward_call_is_exact():
    torch.manual_seed(0)
    m = CallsForwardDirectly().double()
    x = X()
    for impl in IMPLS:
        assert rel(lazyfast.empirical_ntk(m, x, implementation=impl), batch_oracle(m, x)) < 1e-10


def test_output_hook_that_changes_the_output_in_place_is_exact():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    m[0].register_forward_hook(lambda mod, a, out: out.mul_(1.5).add_(mod.bias))
    x = X()
    for impl in IMPLS:
        assert rel(lazyfast.empirical_ntk(m, x, implementation=impl), batch_oracle(m, x)) < 1e-10


def test_explain_names_every_parameter_path_and_reason():
    torch.manual_seed(0)
    m = DirectUseBehindBranch().double()

    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.inner(x) * self.scale.exp()  # exp(scale): no operator rule's slot

    r = Raw().double()
    e = lazyfast.explain(r, X())
    paths = {p["name"]: p for p in e.parameters}
    assert paths["inner.0.weight"]["path"] == "rule" and paths["inner.0.weight"]["contraction"] in ("gradients", "pairs")
    assert paths["scale"]["path"] == "remainder" and "no rule for Raw" in paths["scale"]["reason"]
    assert e.implementation in ("structured", "generic") and e.k == 2
    assert 0 < e.rule_fraction < 1 and "remainder (generic path)" in str(e)
    e2 = lazyfast.explain(m, X())
    assert all(p["path"] == "rule" for p in e2.parameters) and e2.implementation == "structured"
    assert lazyfast.explain(lazyfast.TwoLayer(3, 8, dtype=D), X()).implementation == "fused"
