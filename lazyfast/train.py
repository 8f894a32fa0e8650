"""Training loops for lazy / linearized / standard models, with metrics and resumable checkpoints.

:func:`train` runs full-batch gradient descent (``batch_size=None``) or mini-batch SGD
with momentum, on the square loss or the cross-entropy, with the learning-rate schedule
η_t = η0/(1 + β·t) (t counted in steps or in epochs), on the paper's scaled objective
R(α·h)/α² when the model is a :class:`~lazyfast.lazy.LazyModel` (α read from it).

Metrics go to a JSONL file (one JSON object per line, flushed as written). Checkpoints
are written atomically (temporary file + fsync + ``os.replace``) in a framed format
(magic, length, SHA-256 of the payload): a truncated or corrupt file raises
:class:`CheckpointError` and is never loaded. A run resumed from its last checkpoint
reproduces the uninterrupted run bit for bit on CPU: the model, the optimizer, the
step/epoch counters, the data-order generator and its current permutation, and the
global torch RNG are all saved.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from lazyfast import _store
from lazyfast._validation import (check_alpha, check_bool, check_float, check_input, check_int, check_module,
                                  check_positive_finite, model_param_info)
from lazyfast._validation import check_finite
from lazyfast.lazy import LOSSES, _as_regression_target, cross_entropy_loss, square_loss

__all__ = ["TrainConfig", "train", "CheckpointError", "save_checkpoint", "load_checkpoint", "learning_rate",
           "evaluate"]

_MAGIC = b"LAZYFAST-CKPT\x00v1"


class CheckpointError(_store.IntegrityError):
    """A checkpoint file is missing, truncated, corrupt, or from an incompatible run."""


# ----------------------------------------------------------------------------- checkpoint files
def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Writes ``state`` (tensors, dicts, numbers, strings) to ``path`` atomically, framed
    (magic, length, SHA-256) by :mod:`lazyfast._store`: a crash leaves either the previous
    checkpoint or the new one, never a mix."""
    buf = io.BytesIO()
    torch.save(state, buf)
    _store.write_framed(path, buf.getvalue(), _MAGIC)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint`, verifying magic, length and
    SHA-256; raises :class:`CheckpointError` naming the problem otherwise."""
    payload = _store.read_framed(path, _MAGIC, what="checkpoint", error=CheckpointError)
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        lr: initial learning rate η0 (> 0).
        loss: ``"square"`` (R = (1/2n)Σ‖f − y‖², integer labels become one-hot) or
            ``"cross_entropy"`` (integer labels).
        steps: number of optimizer steps (full-batch GD), or None with ``epochs``.
        epochs: number of passes over the data (mini-batch SGD), or None with ``steps``.
        batch_size: None = full batch; otherwise mini-batches from a shuffled order
            (last partial batch kept).
        momentum: SGD momentum (0 = plain GD / SGD).
        lr_decay: β of η_t = η0/(1 + β t).
        lr_decay_unit: ``"step"`` or ``"epoch"``: what t counts.
        alpha: α of the objective R(α h)/α² (the model outputs α h); None reads
            ``model.alpha`` when present, else 1.
        seed: seed of the data-order generator.
        log_every: evaluate and log metrics every this many steps (``log_unit="step"``) or
            epochs (``"epoch"``); metrics are taken before the update of that step.
        log_unit: ``"step"`` or ``"epoch"``.
        eval_batch_size: batch size for computing metrics (None = all at once).
        checkpoint_every: save a checkpoint every this many steps (None = never).
        progress: tqdm progress bar; None = on when the run has ≥ 1000 steps.
    """

    lr: float
    loss: str = "square"
    steps: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    momentum: float = 0.0
    lr_decay: float = 0.0
    lr_decay_unit: str = "step"
    alpha: Optional[float] = None
    seed: int = 0
    log_every: int = 1
    log_unit: str = "step"
    eval_batch_size: Optional[int] = None
    checkpoint_every: Optional[int] = None
    progress: Optional[bool] = None

    def validate(self) -> "TrainConfig":
        check_positive_finite(self.lr, "lr")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps (full-batch GD) or epochs")
        for name in ("steps", "epochs"):
            check_int(getattr(self, name), name, minimum=0, allow_none=True)
        for name in ("batch_size", "eval_batch_size", "checkpoint_every"):
            check_int(getattr(self, name), name, minimum=1, allow_none=True)
        check_int(self.log_every, "log_every", minimum=1)
        check_int(self.seed, "seed")
        check_float(self.momentum, "momentum", nonnegative=True, below=1.0)
        check_float(self.lr_decay, "lr_decay", nonnegative=True)
        for name in ("lr_decay_unit", "log_unit"):
            if getattr(self, name) not in ("step", "epoch"):
                raise ValueError(f"{name} must be 'step' or 'epoch', got {getattr(self, name)!r}")
        if self.alpha is not None:
            check_alpha(self.alpha, "alpha")
        if self.progress is not None:
            check_bool(self.progress, "progress")
        return self


def learning_rate(config: TrainConfig, step: int, epoch: int) -> float:
    """η_t = η0 / (1 + β t) with t = step or epoch (``config.lr_decay_unit``)."""
    t = step if config.lr_decay_unit == "step" else epoch
    return config.lr / (1.0 + config.lr_decay * t)


# ----------------------------------------------------------------------------- metrics
def _loss_value(out, y, loss, name="target"):
    """The loss, with a target-shape error naming ``name`` (``y_train`` / ``y_test``)."""
    if loss == "square":
        return square_loss(out, _as_regression_target(out, y, name))
    if y.dim() != 1 or y.shape[0] != out.shape[0]:
        raise ValueError(f"{name} must have shape ({out.shape[0]},) of class labels, got {tuple(y.shape)}")
    return cross_entropy_loss(out, y)


def _accuracy(out, y) -> Optional[float]:
    """Classification accuracy for integer labels or one-hot float targets; None for regression."""
    if y.is_floating_point():
        one_hot = (y.dim() == 2 and y.shape[1] > 1 and bool(((y == 0) | (y == 1)).all())
                   and bool((y.sum(1) == 1).all()))
        if one_hot:
            return float((out.argmax(1) == y.argmax(1)).double().mean())
        return None
    return float((out.argmax(1) == y).double().mean())


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str = "square", alpha: float = 1.0,
             batch_size: Optional[int] = None, _name: str = "y") -> Dict[str, float]:
    """Loss R(model(x)) (the unscaled predictor loss), objective R/α², and accuracy when
    the targets are labels or one-hot. Returns a dict with ``loss``, ``objective``, ``accuracy``."""
    n = x.shape[0]
    bs = n if batch_size is None else batch_size
    total, correct, have_acc = 0.0, 0.0, True
    for s in range(0, n, max(bs, 1)):
        out = model(x[s:s + bs])
        yb = y[s:s + bs]
        total += float(_loss_value(out, yb, loss, _name)) * out.shape[0]
        acc = _accuracy(out, yb)
        if acc is None:
            have_acc = False
        else:
            correct += acc * out.shape[0]
    n = max(n, 1)
    return {"loss": total / n, "objective": total / n / (alpha * alpha), "accuracy": correct / n if have_acc else None}


# ----------------------------------------------------------------------------- the loop
def _check_targets(y, n, name):
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() == 0 or y.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows (one per input), got shape {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"{name} must be float targets or integer class labels, got dtype {y.dtype}")
    if y.is_floating_point():
        check_finite(**{name: y})


def _config_fingerprint(config: TrainConfig, n: int, data_digest: str = "") -> str:
    """The configuration and a digest of the data (x_train, y_train, x_test, y_test): a
    checkpoint of another problem, even one of the same size, is never resumed."""
    fields = dataclasses.asdict(config)
    fields.pop("progress")
    fields["n_train"] = n
    fields["data_sha256"] = data_digest
    return json.dumps(fields, sort_keys=True)


def _rewrite_metrics(path: str, keep_until_step: int) -> List[Dict[str, Any]]:
    """Keeps the JSONL records logged up to the checkpoint (drops those of the killed tail)."""
    kept: List[Dict[str, Any]] = []
    if not os.path.exists(path):
        return kept
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a partial last line from the kill
            if rec.get("step", -1) < keep_until_step:
                kept.append(rec)
    _store.atomic_write(path, "".join(json.dumps(rec) + "\n" for rec in kept).encode())
    return kept


def train(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, config: TrainConfig, *,
          x_test: Optional[torch.Tensor] = None, y_test: Optional[torch.Tensor] = None,
          metrics_path: Optional[str] = None, checkpoint_path: Optional[str] = None, resume: bool = False,
          callback: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Trains ``model`` in place on the objective R(model(x), y)/α².

    Args:
        model: any module mapping (n, ...) → (n, k): a :class:`LazyModel`, a
            :class:`Linearized`, or a plain network. Its trainable parameters
            (``requires_grad=True``) are optimized with ``torch.optim.SGD``.
        x_train: (n, ...) inputs in the model's dtype and device.
        y_train: (n, k) float targets, or (n,) integer labels.
        config: :class:`TrainConfig`.
        x_test, y_test: optional held-out set, evaluated when metrics are logged.
        metrics_path: JSONL file receiving one record per log point
            (``step``, ``epoch``, ``lr``, ``train_loss``, ``train_objective``, ``train_acc``,
            ``test_loss``, ``test_objective``, ``test_acc``, ``time``).
        checkpoint_path: where checkpoints are written (every ``config.checkpoint_every``
            steps, and at the end).
        resume: when True and ``checkpoint_path`` exists, continue from it (a corrupt file
            raises :class:`CheckpointError`); the metrics file is cut back to the checkpoint.
        callback: called after every optimizer step with a dict (``step``, ``epoch``,
            ``loss`` of that batch, ``model``); may raise to stop the run.

    Returns:
        dict with ``history`` (metric records of this call and, on resume, the kept earlier
        ones), ``step`` (total optimizer steps), ``epoch``, ``resumed_from`` (step or None).
    """
    check_module(model)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    resume = check_bool(resume, "resume")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    check_input(x_train, "x_train", model)
    n = x_train.shape[0]
    if n == 0:
        raise ValueError("x_train is empty")
    _check_targets(y_train, n, "y_train")
    if (x_test is None) != (y_test is None):
        raise ValueError("give both x_test and y_test, or neither")
    if x_test is not None:
        check_input(x_test, "x_test", model, like=x_train, like_name="x_train")
        _check_targets(y_test, x_test.shape[0], "y_test")
    if config.loss == "cross_entropy" and y_train.is_floating_point():
        raise TypeError("loss='cross_entropy' needs integer class labels in y_train")
    # writable paths up front: a bad path must not cost the whole run (and its history)
    for pname, path in (("metrics_path", metrics_path), ("checkpoint_path", checkpoint_path)):
        if path is not None:
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"{pname} must be a path (str or os.PathLike) or None, got {type(path).__name__}")
            _store.check_writable(path, pname)
    _, model_dtype = model_param_info(model)
    alpha = check_alpha(config.alpha if config.alpha is not None else getattr(model, "alpha", 1.0),
                        "config.alpha" if config.alpha is not None else "model.alpha", model_dtype)
    inv_a2 = 1.0 / (alpha * alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)

    bs = n if config.batch_size is None else min(config.batch_size, n)
    batches_per_epoch = math.ceil(n / bs)
    total_steps = config.steps if config.steps is not None else config.epochs * batches_per_epoch
    gen = torch.Generator().manual_seed(int(config.seed))
    fingerprint = _config_fingerprint(config, n, _store.tensor_digest(x_train, y_train, x_test, y_test))

    step, epoch, perm, perm_epoch = 0, 0, None, -1
    history: List[Dict[str, Any]] = []
    resumed_from = None
    if resume and checkpoint_path is not None and os.path.exists(checkpoint_path):
        state = load_checkpoint(checkpoint_path)
        if state.get("fingerprint") != fingerprint:
            raise CheckpointError(f"checkpoint {checkpoint_path!r} was written with a different configuration or "
                                  f"data; refusing to resume (saved: {state.get('fingerprint')}, "
                                  f"now: {fingerprint})")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, epoch = int(state["step"]), int(state["epoch"])
        gen.set_state(state["data_rng"])
        perm, perm_epoch = state["perm"], int(state["perm_epoch"])
        torch.set_rng_state(state["torch_rng"])
        resumed_from = step
        if metrics_path is not None:
            history = _rewrite_metrics(metrics_path, step)
    elif metrics_path is not None:
        open(metrics_path, "w").close()

    def checkpoint():
        if checkpoint_path is None:
            return
        save_checkpoint(checkpoint_path, {
            "fingerprint": fingerprint, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "epoch": epoch, "data_rng": gen.get_state(), "perm": perm, "perm_epoch": perm_epoch,
            "torch_rng": torch.get_rng_state(),
        })

    metrics_fh = open(metrics_path, "a") if metrics_path is not None else None
    show = config.progress if config.progress is not None else total_steps >= 1000
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    t_start = time.perf_counter()

    def log(train_loss_batch: Optional[float]):
        rec: Dict[str, Any] = {"step": step, "epoch": epoch, "lr": learning_rate(config, step, epoch)}
        if config.batch_size is None and train_loss_batch is not None:
            rec["train_loss"] = train_loss_batch
            rec["train_objective"] = train_loss_batch * inv_a2
            rec["train_acc"] = train_acc_batch
        else:
            ev = evaluate(model, x_train, y_train, loss=config.loss, alpha=alpha, batch_size=config.eval_batch_size,
                          _name="y_train")
            rec.update(train_loss=ev["loss"], train_objective=ev["objective"], train_acc=ev["accuracy"])
        if x_test is not None:
            ev = evaluate(model, x_test, y_test, loss=config.loss, alpha=alpha, batch_size=config.eval_batch_size,
                          _name="y_test")
            rec.update(test_loss=ev["loss"], test_objective=ev["objective"], test_acc=ev["accuracy"])
        rec["time"] = time.perf_counter() - t_start
        history.append(rec)
        if metrics_fh is not None:
            metrics_fh.write(json.dumps(rec) + "\n")
            metrics_fh.flush()

    train_acc_batch = None
    warned = []

    def watch(value: float):
        if not warned and not math.isfinite(value):
            warned.append(step)
            warnings.warn(f"train: the loss became {value} at step {step} (diverged: lr too large for this "
                          f"alpha/model?); training goes on, the metrics record it", RuntimeWarning, stacklevel=3)

    try:
        model.train()
        while step < total_steps:
            pos = step % batches_per_epoch
            if config.batch_size is not None and perm_epoch != epoch:
                # one permutation per epoch from the data-order generator; a resumed run
                # restores both, so it neither redraws nor skips a draw
                perm, perm_epoch = torch.randperm(n, generator=gen), epoch
            if config.batch_size is None:
                xb, yb = x_train, y_train
            else:
                idx = perm[pos * bs:(pos + 1) * bs]
                xb, yb = x_train[idx], y_train[idx]
            lr = learning_rate(config, step, epoch)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            r = _loss_value(out, yb, config.loss, "y_train")
            (r * inv_a2).backward()
            log_now = (config.log_unit == "step" and step % config.log_every == 0) or (
                config.log_unit == "epoch" and pos == 0 and epoch % config.log_every == 0)
            if log_now:
                train_acc_batch = _accuracy(out.detach(), yb)
                log(float(r.detach()))
                watch(history[-1]["train_loss"])
            opt.step()
            step += 1
            if step % batches_per_epoch == 0:
                epoch += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(r.detach()):.3e}", refresh=False)
            if config.checkpoint_every is not None and step % config.checkpoint_every == 0:
                checkpoint()
            if callback is not None:
                callback({"step": step, "epoch": epoch, "loss": float(r.detach()), "model": model})
        model.eval()
        log(None)
        watch(history[-1]["train_loss"])
        checkpoint()
    finally:
        if bar is not None:
            bar.close()
        if metrics_fh is not None:
            metrics_fh.close()
    return {"history": history, "step": step, "epoch": epoch, "resumed_from": resumed_from}
