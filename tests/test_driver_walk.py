"""The shared tile drivers (docs/gpu.md) on the CPU, walked as the CUDA backend walks them
(LAZYFAST_DRIVER_WALK=cuda: tiles in order, CUDA tile sizes and default workspace) and with
many small blocks (the knobs set with lazyfast.testing.knobs, which makes the extension re-read them):
results equal the float64 dense reference and the default CPU walk."""
import pytest
import torch

from lazyfast import _ext
from lazyfast import reference as R
from lazyfast._ops.hadamard_gram import hadamard_gram_sum
from lazyfast.testing import knobs, rel_err
from two_layer_cases import inputs, make_model, weights

pytestmark = pytest.mark.skipif(not _ext.HAS_CPU_KERNELS, reason="extension not built")
ops = torch.ops.lazyfast


@pytest.mark.parametrize("walk", ["cpu", "cuda"])
@pytest.mark.parametrize("workspace", [None, "65536"])
def test_two_layer_gram_walks(walk, workspace):
    # workspace: unset (the walk's default) or 64 KiB, many chunks and row blocks.
    with knobs(LAZYFAST_DRIVER_WALK=walk, LAZYFAST_TWO_LAYER_WORKSPACE_BYTES=workspace) as now:
        assert now["LAZYFAST_DRIVER_WALK"] == walk
        assert now["LAZYFAST_TWO_LAYER_WORKSPACE_BYTES"] == int(workspace or 0)
        model = make_model(5, 333, 3, "gelu", bias=True)
        A, c, B = weights(model)
        x1, x2 = inputs(300, 5), inputs(77, 5, seed=2)
        for full in (False, True):
            for xx2 in (None, x2):
                got = ops.two_layer_ntk(x1, xx2, A, c, B, model.scale, 3, full)
                want = R.two_layer_ntk_dense(x1, xx2, A, c, B, model.scale, "gelu", "full" if full else "trace")
                assert rel_err(got, want) < 1e-12, (full, xx2 is None)
                if xx2 is None:
                    g4 = got if full else got[:, :, None, None]
                    assert torch.equal(g4, g4.permute(1, 0, 3, 2))


@pytest.mark.parametrize("rows,cols", [(None, None), ("7", "5"), ("16", "1000")])
@pytest.mark.parametrize("full", [False, True])
def test_hadamard_gram_blocks(rows, cols, full):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    d1, h1 = [r(2, 45, 6), r(2, 45, 4)], [r(45, 3), r(45, 5)]
    d2, h2 = [r(2, 30, 6), r(2, 30, 4)], [r(30, 3), r(30, 5)]
    mode = "full" if full else "trace"
    with knobs(LAZYFAST_HADAMARD_PANEL_ROWS=rows, LAZYFAST_HADAMARD_PANEL_COLS=cols):
        for dd2, hh2 in ((None, None), (d2, h2)):
            got = hadamard_gram_sum(d1, h1, dd2, hh2, h_scale=[1.5, 0.5], beta=[1.0, 0.2], mode=mode)
            D2, H2 = (d1, h1) if dd2 is None else (dd2, hh2)
            want = sum(torch.einsum("aiw,bjw->ijab", a, b) * (s * (h @ hb.T) + bt)[:, :, None, None]
                       for a, b, h, hb, s, bt in zip(d1, D2, h1, H2, [1.5, 0.5], [1.0, 0.2]))
            if not full:
                want = torch.diagonal(want, dim1=2, dim2=3).mean(-1)
            assert rel_err(got, want) < 1e-12
            if dd2 is None:
                g4 = got if full else got[:, :, None, None]
                assert torch.equal(g4, g4.permute(1, 0, 3, 2))
