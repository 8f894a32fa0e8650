"""Property-based tests (hypothesis) of the fused two-layer ops over random shapes."""
from __future__ import annotations

import pytest
import torch

import lazyfast
from lazyfast import reference as R
from lazyfast._ops import two_layer as TL
from lazyfast.models import ACTIVATIONS
from lazyfast.testing import assert_close_rel

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(lazyfast._ext._C is None, reason="lazyfast._C not built")

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

shapes = st.fixed_dictionaries({
    "n1": st.integers(0, 24), "n2": st.integers(0, 24), "d": st.integers(1, 7), "m": st.integers(1, 90),
    "k": st.integers(1, 3), "T": st.integers(0, 4), "bias": st.booleans(), "same": st.booleans(),
    "act": st.sampled_from(ACTIVATIONS), "seed": st.integers(0, 2**16), "scale": st.floats(0.05, 3.0),
})


def _draw(p):
    g = torch.Generator().manual_seed(p["seed"])
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    A, B = r(p["m"], p["d"]), r(p["k"], p["m"])
    c = r(p["m"]) if p["bias"] else None
    return g, r, A, c, B


@SETTINGS
@given(shapes, st.sampled_from(["trace", "full"]))
def test_ntk_random_shapes(p, mode):
    _, r, A, c, B = _draw(p)
    x1 = r(p["n1"], p["d"])
    x2 = None if p["same"] else r(p["n2"], p["d"])
    out = TL.two_layer_ntk(x1, x2, A=A, B=B, c=c, scale=p["scale"], activation=p["act"], mode=mode)
    ref = R.two_layer_ntk_dense(x1, x2, A, c, B, p["scale"], p["act"], mode)
    assert_close_rel(out, ref, torch.float64)
    # Positive semi-definite in the symmetric trace case: a Gram matrix of Jacobians.
    if x2 is None and mode == "trace" and p["n1"]:
        assert torch.linalg.eigvalsh(out).min() >= -1e-9 * max(1.0, float(out.abs().max()))


@SETTINGS
@given(shapes)
def test_products_random_shapes(p):
    _, r, A, c, B = _draw(p)
    s, act, T = p["scale"], p["act"], p["T"]
    x = r(p["n1"], p["d"])
    dA, dc, dB = r(T, p["m"], p["d"]), r(T, p["m"]), r(T, p["k"], p["m"])
    w = dict(A=A, B=B, c=c, scale=s, activation=act)
    assert_close_rel(TL.two_layer_jvp(x, dA=dA, dc=dc, dB=dB, **w),
                     R.two_layer_jvp_dense(x, A, c, B, s, act, dA, dc, dB), torch.float64)
    cot = r(p["n1"], p["k"])
    for got, want in zip(TL.two_layer_vjp(x, cot, **w), R.two_layer_vjp_dense(x, A, c, B, s, act, cot)):
        assert_close_rel(got, want, torch.float64)
    x2 = None if p["same"] else r(p["n2"], p["d"])
    v = r((p["n1"] if x2 is None else p["n2"]), p["k"])
    out = TL.two_layer_ntk_vp(x, v, x2, **w)
    assert_close_rel(out, R.two_layer_ntk_vp_dense(x, x2, A, c, B, s, act, v), torch.float64)
    # Θ·v agrees with the fused Gram applied to v (two independent fused paths).
    full = TL.two_layer_ntk(x, x2, mode="full", **w)
    assert_close_rel(out, torch.einsum("ijab,jb->ia", full, v), torch.float64)
