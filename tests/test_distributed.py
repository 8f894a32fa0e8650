"""Block-partitioned eNTK under torchrun with 2 gloo processes (CPU)."""
import os
import re
from pathlib import Path

import pytest
import torch

import lazyfast
from lazyfast.cli import _build_model, _load_inputs, build_parser
from lazyfast.distributed import distributed_ntk, row_blocks
from lazyfast.testing import assert_close_rel
from torchrun_util import run_job

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--synthetic", "29", "--input-dim", "5", "--width", "12", "--outputs", "2", "--bias",
        "--activation", "tanh", "--block-size", "6", "--dtype", "float64", "--mode", "full"]


def _ntk_cli(out, *extra, nproc=None):
    return run_job(["-m", "lazyfast.cli", "ntk", *ARGS, "--out", str(out), *extra], nproc=nproc)


def _expected():
    args = build_parser().parse_args(["ntk", *ARGS, "--out", "unused"])
    torch.set_num_threads(1)
    try:
        model = _build_model(args).double()
        x1, _ = _load_inputs(args, model)
        return lazyfast.empirical_ntk(model, x1.double(), mode="full")
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))


def _computed(stdout):
    # Ranks share one pipe, so their lines may interleave: find every report anywhere.
    found = re.findall(r"computed blocks \[([0-9, ]*)\]", stdout)
    return sorted(int(b) for group in found for b in group.split(",") if b.strip())


@pytest.mark.slow
def test_two_gloo_ranks_equal_single_process_and_resume(tmp_path):
    d2, d1 = tmp_path / "two", tmp_path / "one"
    first = _ntk_cli(d2, nproc=2)
    assert _computed(first) == [0, 1, 2, 3, 4]
    _ntk_cli(d1)
    k2, k1 = torch.load(d2 / "kernel.pt"), torch.load(d1 / "kernel.pt")
    assert k2.shape == (29, 29, 2, 2) and k2.dtype == torch.float64
    assert torch.equal(k2, k1), "2-rank kernel differs from the single-process kernel"
    assert_close_rel(k2, _expected(), dtype=torch.float64)

    # Restart after a "kill": one block never written, one left truncated mid-write.
    (d2 / "block_00001.pt").unlink()
    data = (d2 / "block_00003.pt").read_bytes()
    (d2 / "block_00003.pt").write_bytes(data[: len(data) // 2])
    (d2 / "kernel.pt").unlink()
    again = _ntk_cli(d2, nproc=2)
    assert _computed(again) == [1, 3]
    assert torch.equal(torch.load(d2 / "kernel.pt"), k1)

    # In-memory gather (no shards) over two ranks gives the same kernel.
    mem = tmp_path / "mem"
    _ntk_cli(mem, "--in-memory", nproc=2)
    assert torch.equal(torch.load(mem / "kernel.pt"), k1)
    assert not list(mem.glob("block_*.pt"))


def test_manifest_protects_against_mixing_problems(tmp_path):
    torch.manual_seed(0)
    model = lazyfast.TwoLayer(3, 8, dtype=torch.float64)
    x = torch.randn(10, 3, dtype=torch.float64)
    res = distributed_ntk(model, x, block_size=4, out_dir=str(tmp_path))
    assert res.computed_blocks == [0, 1, 2] and res.n_blocks == 3
    assert_close_rel(res.kernel, lazyfast.empirical_ntk(model, x), dtype=torch.float64)
    again = distributed_ntk(model, x, block_size=4, out_dir=str(tmp_path))
    assert again.computed_blocks == [] and again.skipped_blocks == [0, 1, 2]
    assert torch.equal(again.kernel, res.kernel)
    with pytest.raises(ValueError, match="holds shards of a different problem"):
        distributed_ntk(model, x * 2, block_size=4, out_dir=str(tmp_path))
    redo = distributed_ntk(model, x * 2, block_size=4, out_dir=str(tmp_path), overwrite=True)
    assert redo.computed_blocks == [0, 1, 2]


def test_single_process_in_memory_and_x2():
    torch.manual_seed(0)
    model = lazyfast.MLP(4, [7], 3, dtype=torch.float64)
    x1, x2 = torch.randn(9, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    res = distributed_ntk(model, x1, x2, mode="full", block_size=2)
    assert_close_rel(res.kernel, lazyfast.empirical_ntk(model, x1, x2, mode="full"), dtype=torch.float64)
    empty = distributed_ntk(model, x1[:0], x2, block_size=2)
    assert empty.kernel.shape == (0, 5)


def test_row_blocks_and_bad_block_size():
    assert row_blocks(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert row_blocks(0, 3) == []
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        row_blocks(5, 0)
