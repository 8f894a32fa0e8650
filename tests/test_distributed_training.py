"""Data-parallel lazy and linearized training: 2 gloo ranks (DDP) vs one process."""
from pathlib import Path

import pytest
import torch

from lazyfast.distributed import train_data_parallel
from lazyfast.testing import assert_close_rel
from torchrun_util import run_job

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"


def _run(kind, out, nproc):
    run_job([str(WORKER), kind, str(out)], nproc=nproc if nproc > 1 else None)
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lazy", "linearized"])
def test_ddp_two_ranks_match_single_process(kind, tmp_path):
    two = _run(kind, tmp_path / "two.pt", 2)
    one = _run(kind, tmp_path / "one.pt", 1)
    assert two["state_dict"].keys() == one["state_dict"].keys()
    for name in one["state_dict"]:
        assert_close_rel(two["state_dict"][name], one["state_dict"][name], dtype=torch.float64, rtol=1e-12, what=name)
    assert_close_rel(torch.tensor(two["losses"]), torch.tensor(one["losses"]), dtype=torch.float64, rtol=1e-12)
    # Training did something: the objective went down.
    assert one["losses"][-1] < one["losses"][0]


def test_train_data_parallel_bad_arguments():
    model = torch.nn.Linear(3, 1).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="lr must be finite"):
        train_data_parallel(model, x, y, steps=1, lr=-1.0)
    with pytest.raises(ValueError, match="steps must be"):
        train_data_parallel(model, x, y, steps=-1, lr=0.1)
    with pytest.raises(ValueError, match="y has 3 samples"):
        train_data_parallel(model, x, y[:3], steps=1, lr=0.1)
    with pytest.raises(ValueError, match="batch_size must be"):
        train_data_parallel(model, x, y, steps=1, lr=0.1, batch_size=0)
