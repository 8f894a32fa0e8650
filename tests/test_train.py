"""Training loop: schedules, metrics, checkpoint/resume (bit-identical) and corrupt-file detection."""
import json
import os

import pytest
import torch

from lazyfast.lazy import LazyModel, Linearized
from lazyfast.models import TwoLayer
from lazyfast.train import CheckpointError, TrainConfig, learning_rate, load_checkpoint, save_checkpoint, train

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def data(n=40, d=5, k=3, labels=False, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    if labels:
        y = torch.randint(0, k, (n,), generator=g)
    else:
        y = torch.randn(n, k, generator=g, dtype=dtype)
    return x, y


def make(kind, dtype=F64, k=3):
    torch.manual_seed(0)
    net = TwoLayer(5, 16, k, activation="relu", bias=True, dtype=dtype)
    if kind == "lazy":
        return LazyModel(net, 10.0)
    if kind == "linearized":
        return LazyModel(Linearized(net), 10.0)
    return net


class Kill(Exception):
    pass


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


CONFIGS = {
    "sgd_momentum_epoch_decay": dict(lr=0.3, epochs=4, batch_size=7, momentum=0.9, lr_decay=1 / 3,
                                     lr_decay_unit="epoch", log_unit="epoch", checkpoint_every=4),
    "full_batch_gd": dict(lr=0.5, steps=12, lr_decay=0.1, checkpoint_every=5),
}


@pytest.mark.parametrize("kind", ["lazy", "linearized"])
@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("loss", ["square", "cross_entropy"])
def test_resume_after_kill_is_bit_identical(tmp_path, kind, cfg_name, loss):
    x, y = data(labels=loss == "cross_entropy")
    xt, yt = data(n=9, labels=loss == "cross_entropy", seed=1)
    cfg = TrainConfig(loss=loss, progress=False, **CONFIGS[cfg_name])

    ref_model = make(kind)
    ref = train(ref_model, x, y, cfg, x_test=xt, y_test=yt, metrics_path=str(tmp_path / "ref.jsonl"))

    model = make(kind)
    ck, mp = str(tmp_path / "run.ckpt"), str(tmp_path / "run.jsonl")
    kill_at = 11 if cfg_name.startswith("sgd") else 8  # mid-epoch, after the last checkpoint

    def killer(state):
        if state["step"] == kill_at:
            raise Kill

    torch.manual_seed(123)  # global RNG state differs before the crash...
    with pytest.raises(Kill):
        train(model, x, y, cfg, x_test=xt, y_test=yt, metrics_path=mp, checkpoint_path=ck, callback=killer)
    assert not os.path.exists(ck + ".tmp")
    # ...a fresh process: new model object, other RNG state; resume restores everything
    torch.manual_seed(999)
    model2 = make(kind)
    out = train(model2, x, y, cfg, x_test=xt, y_test=yt, metrics_path=mp, checkpoint_path=ck, resume=True)
    assert out["resumed_from"] == (8 if cfg_name.startswith("sgd") else 5)
    assert out["step"] == ref["step"]
    for p, q in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    # metrics file: the killed tail is dropped, the records equal the uninterrupted run's
    strip = lambda recs: [{k: v for k, v in r.items() if k != "time"} for r in recs]  # noqa: E731
    lines = [json.loads(s) for s in open(mp)]
    ref_lines = [json.loads(s) for s in open(tmp_path / "ref.jsonl")]
    assert strip(lines) == strip(ref_lines)


def test_metrics_jsonl_and_schedule(tmp_path):
    x, y = data(labels=True)
    xt, yt = data(n=9, labels=True, seed=1)
    mp = str(tmp_path / "m.jsonl")
    cfg = TrainConfig(lr=0.2, steps=10, lr_decay=0.5, log_every=3, loss="cross_entropy", progress=False)
    out = train(make("plain"), x, y, cfg, x_test=xt, y_test=yt, metrics_path=mp)
    recs = [json.loads(s) for s in open(mp)]
    assert [r["step"] for r in recs] == [0, 3, 6, 9, 10]
    assert recs == [dict(r) for r in out["history"]]
    for r in recs:
        assert r["lr"] == pytest.approx(0.2 / (1 + 0.5 * r["step"]))
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1
        assert set(r) >= {"train_loss", "train_objective", "test_loss", "test_objective", "epoch", "time"}
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    assert learning_rate(TrainConfig(lr=1.0, epochs=1, lr_decay=1 / 3, lr_decay_unit="epoch"), 50, 3) == 0.5


def test_accuracy_only_for_classification_targets():
    x, labels = data(labels=True)
    onehot = torch.nn.functional.one_hot(labels, 3).to(F64)
    xr, yr = data()
    cfg = TrainConfig(lr=0.1, steps=1, progress=False)
    acc_labels = train(make("plain"), x, labels, cfg)["history"][0]["train_acc"]
    acc_onehot = train(make("plain"), x, onehot, cfg)["history"][0]["train_acc"]
    assert acc_labels == acc_onehot and 0 <= acc_labels <= 1
    assert train(make("plain"), xr, yr, cfg)["history"][0]["train_acc"] is None  # regression


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_lazy_objective_scaling_and_dtypes(dtype):
    x, y = data(dtype=dtype)
    model = make("lazy", dtype=dtype)
    out = train(model, x, y, TrainConfig(lr=0.5, steps=30, progress=False))
    h = out["history"]
    # the objective is R(αh)/α² with α read from the LazyModel
    assert h[0]["train_objective"] == pytest.approx(h[0]["train_loss"] / 100.0)
    assert h[-1]["train_loss"] < 0.8 * h[0]["train_loss"]
    assert all(p.dtype == dtype for p in model.parameters())


def test_progress_bar_runs(capsys):
    x, y = data()
    train(make("plain"), x, y, TrainConfig(lr=0.1, steps=3, progress=True))
    assert "train" in capsys.readouterr().err


def test_checkpoint_corruption_is_detected(tmp_path):
    path = str(tmp_path / "c.ckpt")
    save_checkpoint(path, {"w": torch.arange(100.0), "step": 3})
    assert load_checkpoint(path)["step"] == 3
    raw = open(path, "rb").read()
    # flipped byte in the payload
    bad = bytearray(raw)
    bad[-10] ^= 0xFF
    open(path, "wb").write(bytes(bad))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)
    # truncated (a partial write)
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    open(path, "wb").write(raw[:20])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    # not a checkpoint at all
    open(path, "wb").write(b"x" * 200)
    with pytest.raises(CheckpointError, match="magic"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.ckpt"))


def test_resume_refuses_corrupt_or_foreign_checkpoint(tmp_path):
    x, y = data()
    ck = str(tmp_path / "r.ckpt")
    cfg = TrainConfig(lr=0.1, steps=4, checkpoint_every=2, progress=False)
    train(make("plain"), x, y, cfg, checkpoint_path=ck)
    raw = open(ck, "rb").read()
    open(ck, "wb").write(raw[:-1])
    model = make("plain")
    before = params_of(model)
    with pytest.raises(CheckpointError, match="truncated"):
        train(model, x, y, cfg, checkpoint_path=ck, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing loaded
    open(ck, "wb").write(raw)
    with pytest.raises(CheckpointError, match="different configuration"):
        train(make("plain"), x, y, TrainConfig(lr=0.2, steps=4, progress=False), checkpoint_path=ck, resume=True)


@pytest.mark.parametrize("bad, match", [
    (dict(lr=0.0, steps=1), "lr"),
    (dict(lr=float("nan"), steps=1), "lr"),
    (dict(lr=0.1), "exactly one of steps"),
    (dict(lr=0.1, steps=1, epochs=1), "exactly one of steps"),
    (dict(lr=0.1, steps=-1), "steps"),
    (dict(lr=0.1, steps=1, batch_size=0), "batch_size"),
    (dict(lr=0.1, steps=1, momentum=1.0), "momentum"),
    (dict(lr=0.1, steps=1, loss="hinge"), "loss"),
    (dict(lr=0.1, steps=1, lr_decay=-1.0), "lr_decay"),
    (dict(lr=0.1, steps=1, alpha=0.0), "alpha"),
    (dict(lr=0.1, steps=1, log_unit="hour"), "log_unit"),
])
def test_config_validation(bad, match):
    x, y = data()
    with pytest.raises(ValueError, match=match):
        train(make("plain"), x, y, TrainConfig(**bad))


def test_bad_data_is_named():
    x, y = data()
    cfg = TrainConfig(lr=0.1, steps=1, progress=False)
    with pytest.raises(ValueError, match="x_train contains NaN"):
        train(make("plain"), x * float("nan"), y, cfg)
    with pytest.raises(ValueError, match="y_train contains NaN"):
        train(make("plain"), x, y * float("inf"), cfg)
    with pytest.raises(ValueError, match="y_train must have 40 rows"):
        train(make("plain"), x, y[:5], cfg)
    with pytest.raises(ValueError, match=r"x_train must have shape \(n, 5\)"):
        train(make("plain"), x[:, :4], y, cfg)
    with pytest.raises(TypeError, match="x_train has dtype"):
        train(make("plain"), x.float(), y, cfg)
    with pytest.raises(ValueError, match="x_test and y_test"):
        train(make("plain"), x, y, cfg, x_test=x)
    with pytest.raises(TypeError, match="integer class labels"):
        train(make("plain"), x, y, TrainConfig(lr=0.1, steps=1, loss="cross_entropy"))
