"""``lazyfast ntk --model m.pt``: any module ``torch.save`` can store (BatchNorm included), on
real or integer (token-id) data, gives the kernel of ``lazyfast.empirical_ntk``; the shard
store's fingerprint covers every parameter and buffer (issue 18, "exact on every call").

The models are nn.Sequential of standard layers, or classes defined at module level here, so
a whole pickled module loads back (``torch.load`` imports the class by its module path).
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

import lazyfast
from lazyfast import cli as cli_module
from lazyfast.distributed import distributed_ntk, fingerprint
from lazyfast.testing import assert_close_rel

D64 = torch.float64


class TokenNet(nn.Module):
    """Token ids (n, L) -> embeddings (n, L, e) -> mean over the sequence -> (n, k)."""

    def __init__(self, vocab=11, e=4, k=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, e)
        self.head = nn.Linear(e, k)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


class WithExtraBuffers(nn.Module):
    """A linear model with a non-persistent buffer (absent from state_dict), a bool mask and
    a 0-dim float parameter."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.gain = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("shift", torch.zeros(2, 3).t(), persistent=False)  # non-contiguous (3, 2)
        self.register_buffer("mask", torch.ones(3, dtype=torch.bool))

    def forward(self, x):
        return self.gain * self.lin(x * self.mask + self.shift.sum(1))


def _bn_model():
    """Conv -> BatchNorm2d -> ReLU -> Linear, with running statistics from a few training
    batches (num_batches_tracked = 3, a 0-dim int64 buffer), in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 2, 6, 6))
    return model.eval()


def _run(capsys, *args):
    """``lazyfast ARGS`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = cli_module.main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _ntk(capsys, tmp_path, model_path, data_path, *extra, out="out"):
    rc, stdout, stderr = _run(capsys, "ntk", "--model", model_path, "--data", data_path, "--out", tmp_path / out,
                              "--quiet", *extra)
    assert rc == 0, stderr
    return torch.load(tmp_path / out / "kernel.pt"), stdout


# ----------------------------------------------------------------------------- BatchNorm
def test_cli_batchnorm_model_gives_the_kernel_of_empirical_ntk_and_resumes(tmp_path, capsys):
    model = _bn_model()
    assert model[1].num_batches_tracked.dim() == 0 and int(model[1].num_batches_tracked) == 3
    torch.save(model, tmp_path / "bn.pt")
    x = torch.randn(7, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    K, _ = _ntk(capsys, tmp_path, tmp_path / "bn.pt", tmp_path / "x.pt", "--dtype", "float64", "--mode", "full",
                "--block-size", "3")
    ref = lazyfast.empirical_ntk(model.double(), x.double(), mode="full")
    assert K.shape == (7, 7, 2, 2) and K.dtype == D64
    assert_close_rel(K, ref, dtype=D64)
    # a rerun finds every block on disk (the fingerprint is the same for the same problem)
    (tmp_path / "out" / "kernel.pt").unlink()
    K2, stdout = _ntk(capsys, tmp_path, tmp_path / "bn.pt", tmp_path / "x.pt", "--dtype", "float64", "--mode",
                      "full", "--block-size", "3")
    assert "computed blocks [], skipped (already on disk) [0, 1, 2]" in stdout
    assert torch.equal(K2, K)


def test_cli_float32_batchnorm_model(tmp_path, capsys):
    model = _bn_model()
    torch.save(model, tmp_path / "bn.pt")
    x = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    torch.save({"x1": x, "x2": x[:3] * 0.5}, tmp_path / "x.pt")
    K, _ = _ntk(capsys, tmp_path, tmp_path / "bn.pt", tmp_path / "x.pt")
    assert K.dtype == torch.float32 and K.shape == (4, 3)
    assert_close_rel(K, lazyfast.empirical_ntk(model, x, x[:3] * 0.5), dtype=torch.float32)


# ----------------------------------------------------------------------------- token ids
def test_cli_embedding_model_on_int64_token_ids(tmp_path, capsys):
    torch.manual_seed(0)
    model = TokenNet()
    torch.save(model, tmp_path / "tok.pt")
    g = torch.Generator().manual_seed(3)
    ids1, ids2 = torch.randint(0, 11, (6, 5), generator=g), torch.randint(0, 11, (4, 5), generator=g)
    torch.save({"x1": ids1, "x2": ids2}, tmp_path / "ids.pt")
    K, _ = _ntk(capsys, tmp_path, tmp_path / "tok.pt", tmp_path / "ids.pt", "--dtype", "float64", "--mode", "full",
                "--block-size", "4")
    ref = lazyfast.empirical_ntk(model.double(), ids1, ids2, mode="full")  # the Python API takes token ids
    assert K.shape == (6, 4, 2, 2)
    assert_close_rel(K, ref, dtype=D64)
    # the same through the shard store directly, and an id change is a different problem
    res = distributed_ntk(model.double(), ids1, ids2, mode="full", block_size=4, out_dir=str(tmp_path / "s"))
    assert torch.equal(res.kernel, K)
    with pytest.raises(ValueError, match="different problem"):
        distributed_ntk(model.double(), (ids1 + 1) % 11, ids2, mode="full", block_size=4, out_dir=str(tmp_path / "s"))


def test_cli_refuses_bool_data_naming_it(tmp_path, capsys):
    torch.save(TokenNet(), tmp_path / "tok.pt")
    torch.save(torch.ones(3, 5, dtype=torch.bool), tmp_path / "mask.pt")
    rc, _, stderr = _run(capsys, "ntk", "--model", tmp_path / "tok.pt", "--data", tmp_path / "mask.pt",
                         "--out", tmp_path / "out")
    assert rc == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("lazyfast ntk: error: --data") and "x1" in last and "torch.bool" in last, last
    assert "integer" in last, last


def test_cli_model_whose_class_cannot_be_imported_says_so(tmp_path, capsys):
    mod = types.ModuleType("lazyfast_test_vanishing_module")
    exec("from torch import nn\nclass Net(nn.Linear):\n    pass\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    try:
        torch.save(mod.Net(3, 2), tmp_path / "net.pt")
    finally:
        del sys.modules[mod.__name__]
    torch.save(torch.randn(4, 3), tmp_path / "x.pt")
    rc, _, stderr = _run(capsys, "ntk", "--model", tmp_path / "net.pt", "--data", tmp_path / "x.pt",
                         "--out", tmp_path / "out")
    assert rc == 2
    last = stderr.strip().splitlines()[-1]
    assert "--model" in last and "cannot load it" in last and "imported" in last, last


# ----------------------------------------------------------------------------- fingerprint
def test_fingerprint_changes_when_any_parameter_or_buffer_value_changes():
    model = _bn_model()
    x = torch.randn(3, 2, 6, 6)
    fp = fingerprint(model, x)
    assert fingerprint(model, x) == fp  # deterministic
    bn = model[1]
    with torch.no_grad():
        for t, change in ((bn.num_batches_tracked, lambda t: t.add_(1)),  # 0-dim int64
                          (bn.running_mean, lambda t: t[1].add_(1e-3)),
                          (bn.running_var, lambda t: t[2].mul_(2.0)),
                          (bn.weight, lambda t: t[0].add_(1e-6)),
                          (model[0].weight, lambda t: t[0, 0, 0, 0].sub_(1e-6))):
            old = t.clone()
            change(t)
            assert fingerprint(model, x) != fp
            t.copy_(old)
            assert fingerprint(model, x) == fp
    assert fingerprint(model, x + 1e-7) != fp


def test_fingerprint_covers_non_persistent_bool_and_0_dim_tensors_by_value():
    torch.manual_seed(0)
    model = WithExtraBuffers()
    assert "shift" not in model.state_dict() and not model.shift.is_contiguous()
    fp = fingerprint(model)
    twin = WithExtraBuffers()
    twin.load_state_dict(model.state_dict())
    twin.shift = model.shift.contiguous()  # same values, another memory layout
    assert fingerprint(twin) == fp
    with torch.no_grad():
        model.gain.add_(1.0)  # 0-dim float parameter
        assert fingerprint(model) != fp
        model.gain.sub_(1.0)
        assert fingerprint(model) == fp
        model.mask[1] = False  # bool buffer
        assert fingerprint(model) != fp
        model.mask[1] = True
        model.shift[2, 1] = 0.5  # non-persistent, non-contiguous buffer
        assert fingerprint(model) != fp
    # and tensors of every dtype and shape are hashed: 0-dim, int64, bool, complex, empty, sparse
    fingerprint(model, torch.tensor(3), torch.tensor(True), torch.ones(2, 2, dtype=torch.complex64).conj(),
                torch.zeros(0, 4), torch.eye(3).to_sparse(), torch.arange(6.0).reshape(2, 3).t())


def test_fingerprint_sees_the_architecture_not_only_the_values():
    """Same seed, same parameter values, another activation: another problem (shards never mixed)."""
    from lazyfast.distributed import fingerprint

    torch.manual_seed(0)
    a = lazyfast.TwoLayer(3, 8, activation="relu", dtype=torch.float64)
    torch.manual_seed(0)
    b = lazyfast.TwoLayer(3, 8, activation="tanh", dtype=torch.float64)
    torch.manual_seed(0)
    c = lazyfast.TwoLayer(3, 8, activation="relu", dtype=torch.float64)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint(c)
