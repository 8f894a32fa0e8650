"""The C++ runtime knobs (csrc/knobs.h, docs/knobs.md): read from the environment once, not on
every op call; re-read by lazyfast._ext.reload_knobs() and lazyfast.testing.knobs(...)."""
import os

import pytest
import torch

from lazyfast import _ext
from lazyfast.testing import knobs
from two_layer_cases import inputs, make_model, weights

pytestmark = pytest.mark.skipif(not _ext.HAS_CPU_KERNELS, reason="extension not built")
ops = torch.ops.lazyfast

INT_KNOBS = ("LAZYFAST_TWO_LAYER_WORKSPACE_BYTES", "LAZYFAST_TL_RB", "LAZYFAST_TL_MC",
             "LAZYFAST_HADAMARD_PANEL_ROWS", "LAZYFAST_HADAMARD_PANEL_COLS")


def _vjp():
    model = make_model(4, 50, 2, "tanh", bias=True)
    A, c, B = weights(model)
    x = inputs(20, 4)
    return ops.two_layer_vjp(x, A, c, B, model.scale, 2, inputs(20, 2, seed=1))


def test_every_knob_is_reported():
    assert set(_ext.knobs()) == set(INT_KNOBS) | {"LAZYFAST_DRIVER_WALK"}


def test_environment_is_not_reread_per_call_only_on_reload(monkeypatch):
    with knobs(LAZYFAST_TL_RB=None, LAZYFAST_DRIVER_WALK=None):
        before = _ext.knobs()
        assert before["LAZYFAST_TL_RB"] == 0 and before["LAZYFAST_DRIVER_WALK"] == "cpu"
        monkeypatch.setenv("LAZYFAST_TL_RB", "7")
        monkeypatch.setenv("LAZYFAST_DRIVER_WALK", "cuda")
        want = _vjp()  # an op call does not read the environment
        assert _ext.knobs() == before
        now = _ext.reload_knobs()
        assert now["LAZYFAST_TL_RB"] == 7 and now["LAZYFAST_DRIVER_WALK"] == "cuda"
        assert _ext.knobs() == now
        for got, w in zip(_vjp(), want):  # 7-row blocks: same result up to rounding
            torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)
        monkeypatch.delenv("LAZYFAST_TL_RB")
        monkeypatch.delenv("LAZYFAST_DRIVER_WALK")
        assert _ext.knobs() == now  # still the values read at the reload
    assert _ext.knobs() == before  # the context manager reloaded on exit


def test_context_manager_restores_environment_and_knobs():
    os.environ.pop("LAZYFAST_TL_MC", None)
    os.environ["LAZYFAST_HADAMARD_PANEL_COLS"] = "9"
    try:
        _ext.reload_knobs()
        with pytest.raises(KeyError):
            with knobs(LAZYFAST_TL_MC=32, LAZYFAST_HADAMARD_PANEL_COLS=None) as now:
                assert now["LAZYFAST_TL_MC"] == 32 and os.environ["LAZYFAST_TL_MC"] == "32"
                assert now["LAZYFAST_HADAMARD_PANEL_COLS"] == 0 and "LAZYFAST_HADAMARD_PANEL_COLS" not in os.environ
                raise KeyError("boom")
        assert "LAZYFAST_TL_MC" not in os.environ and os.environ["LAZYFAST_HADAMARD_PANEL_COLS"] == "9"
        assert _ext.knobs()["LAZYFAST_TL_MC"] == 0 and _ext.knobs()["LAZYFAST_HADAMARD_PANEL_COLS"] == 9
    finally:
        os.environ.pop("LAZYFAST_HADAMARD_PANEL_COLS", None)
        _ext.reload_knobs()
    with pytest.raises(ValueError, match="LAZYFAST_"):
        with knobs(TL_RB=4):
            pass


@pytest.mark.parametrize("name", INT_KNOBS)
@pytest.mark.parametrize("text,value", [("4096", 4096), ("64k", 64), (" 12", 12), ("0", 0), ("-5", 0),
                                        ("abc", 0), ("", 0)])
def test_integer_parse(name, text, value):
    # std::atoll, only > 0 counts (docs/knobs.md): anything else means unset.
    with knobs(**{name: text}) as now:
        assert now[name] == value


@pytest.mark.parametrize("text,walk", [("cuda", "cuda"), ("cpu", "cpu"), ("CUDA", "cpu"), ("", "cpu")])
def test_driver_walk_parse(text, walk):
    with knobs(LAZYFAST_DRIVER_WALK=text) as now:
        assert now["LAZYFAST_DRIVER_WALK"] == walk
