"""The model's output and its forward's failures, as the engine sees them (docs/contracts.md).

* :func:`model_output`: the output must be a tensor (n,) or (n, k) with the batch first; anything
  else (a tuple, a dict or ``ModelOutput``, (k, n), (n, L, V)) is a clear error saying what to pass
  (``output_fn=``).
* :func:`run_forward`: an exception of the model's own forward (wrong input shape, token ids out of
  range, ...) becomes :class:`ModelForwardError`, which quotes the user's input shape (not a probe's)
  and which the public API re-raises naming the argument.
* :class:`OutputSelect`: a model seen through ``output_fn``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from lazyfast._engine.state import StateGuard


class ModelForwardError(ValueError):
    """The model's own forward failed on the inputs (wrong shape, token ids out of range, ...).
    ``detail`` says what happened; the public API re-raises it naming the argument."""

    def __init__(self, detail: str, name: str = "x"):
        super().__init__(f"{name} {detail}")
        self.detail, self.name = detail, name


def run_forward(model: nn.Module, x: torch.Tensor, shown: Optional[torch.Tensor] = None):
    """``model(x)``; an exception of the model's own forward becomes a :class:`ModelForwardError`
    quoting the user's input shape (``shown``: the batch the user passed, when ``x`` is a probe
    made from it) and, for integer inputs, the range of the ids. lazyfast's own clear errors
    (raised from its files: aliases, a lazyfast model's input checks) pass unchanged."""
    try:
        return model(x)
    except (ValueError, TypeError, RuntimeError, IndexError, AssertionError, NotImplementedError) as e:
        if isinstance(e, ModelForwardError) or (isinstance(e, (ValueError, TypeError)) and _raised_by_lazyfast(e)):
            raise
        raise ModelForwardError(_forward_detail(shown if shown is not None else x, e)) from e


def _raised_by_lazyfast(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "lazyfast" in tb.tb_frame.f_code.co_filename.replace("\\", "/").split("/")[-2:-1]


def _forward_detail(x: torch.Tensor, e: BaseException) -> str:
    what = f"(shape {tuple(x.shape)}, {x.dtype})"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    hint = ""
    if not (x.is_floating_point() or x.is_complex()) and x.numel() and x.device.type != "meta":
        what = f"(shape {tuple(x.shape)}, {x.dtype}, values in [{int(x.min())}, {int(x.max())}])"
        if isinstance(e, IndexError) or "index" in msg.lower():
            hint = "; token ids must lie in [0, num_embeddings) of the embedding that reads them"
    if "not compiled with CUDA" in msg:
        hint = "; this torch has no CUDA: keep the model and the inputs on the CPU"
    return (f"{what} cannot go through the model: its forward raised {type(e).__name__}: {msg}{hint}. "
            "Inputs are passed to the model as they are, batch first: check their per-sample shape and dtype "
            "against what the model's forward expects")


def model_output(out, n: int, what: str = "the model"):
    """The model's output as a batch: a tensor (n,) or (n, k). Anything else is a clear error
    that names what was returned and how to select the kernel's output (``output_fn=``)."""
    if not isinstance(out, torch.Tensor):
        kind = type(out).__name__
        fields = ""
        if isinstance(out, dict) or hasattr(out, "keys"):
            try:
                fields = f" with keys {list(out.keys())}"
            except Exception:  # noqa: BLE001
                fields = ""
        raise TypeError(f"{what} returned a {kind}{fields}, not a tensor: the eNTK is of one tensor output (n, k). "
                        "Pick it with output_fn=: output_fn='logits' (an attribute or key, e.g. a Hugging Face "
                        "ModelOutput), output_fn=0 (an element of a tuple), or any callable out -> tensor")
    if out.dim() == 0:
        raise ValueError(f"{what} returned a 0-dim tensor: its output must be batched, (n,) or (n, k) for n = {n} "
                         "samples (a loss or a sum over the batch is not a per-sample output)")
    if out.shape[0] != n:
        axes = [d for d in range(1, out.dim()) if out.shape[d] == n]
        where = f" (axis {axes[0]} has size {n}: move it first, e.g. output_fn=lambda out: out.movedim({axes[0]}, 0))" \
            if axes else ""
        raise ValueError(f"{what} returned shape {tuple(out.shape)} for a batch of {n} samples: the output's first "
                         f"axis must be the batch axis, with sample i depending on x[i] only{where}")
    if out.dim() > 2:
        raise ValueError(f"{what} returned shape {tuple(out.shape)}: lazyfast takes outputs (n,) or (n, k), so this "
                         f"would be a kernel of k = {math.prod(out.shape[1:])} outputs per sample. Say which outputs "
                         "the kernel is of with output_fn=: e.g. output_fn=lambda out: out[:, -1] (the last position), "
                         "out.mean(1) (pooled), or out.flatten(1) (all of them, k = their product)")
    return out




def _select(out, output_fn):
    sel = _select_raw(out, output_fn)
    if not isinstance(sel, torch.Tensor):
        raise TypeError(f"output_fn={output_fn!r} selected a {type(sel).__name__} from the model's output "
                        f"(a {type(out).__name__}), not a tensor")
    return sel


def _select_raw(out, output_fn):
    if callable(output_fn):
        return output_fn(out)
    if isinstance(output_fn, int) and not isinstance(output_fn, bool):
        if isinstance(out, torch.Tensor) or not isinstance(out, (tuple, list)):
            raise ValueError(f"output_fn={output_fn} indexes a tuple or list output, but the model returned a "
                             f"{type(out).__name__}")
        if not -len(out) <= output_fn < len(out):
            raise ValueError(f"output_fn={output_fn} is out of range for the model's {len(out)}-element "
                             f"{type(out).__name__}")
        return out[output_fn]
    if isinstance(output_fn, str):
        if isinstance(out, dict) or (hasattr(out, "keys") and hasattr(out, "__getitem__")):
            if output_fn in out.keys():
                return out[output_fn]
        if hasattr(out, output_fn):
            return getattr(out, output_fn)
        raise ValueError(f"output_fn={output_fn!r}: the model's output (a {type(out).__name__}) has no such key or "
                         "attribute")
    raise TypeError(f"output_fn must be a callable, a str (attribute / key) or an int (index), got "
                    f"{type(output_fn).__name__}")


class OutputSelect(nn.Module):
    """``model`` seen through ``output_fn`` (a callable out → tensor, an attribute or key name, or
    a tuple index). It shares the model's parameters, buffers and submodules (the same dicts), so
    parameter names, ``functional_call`` and every rule see the model itself; the model's own
    hooks run, since its ``__call__`` is used."""

    def __init__(self, model: nn.Module, output_fn):
        super().__init__()
        check_output_fn(output_fn)
        object.__setattr__(self, "_inner", model)
        object.__setattr__(self, "_output_fn", output_fn)
        self.__dict__["_parameters"] = model._parameters
        self.__dict__["_buffers"] = model._buffers
        self.__dict__["_modules"] = model._modules
        self.training = model.training

    def forward(self, *args, **kwargs):
        return _select(self._inner(*args, **kwargs), self._output_fn)

    def train(self, mode: bool = True):
        self._inner.train(mode)
        self.training = mode
        return self


def check_output_fn(output_fn) -> None:
    if output_fn is None or callable(output_fn) or isinstance(output_fn, str) or (
            isinstance(output_fn, int) and not isinstance(output_fn, bool)):
        return
    raise TypeError(f"output_fn must be None, a callable, a str (attribute / key) or an int (index), got "
                    f"{type(output_fn).__name__} {output_fn!r}")


def with_output(model: nn.Module, output_fn) -> nn.Module:
    """``model`` itself for ``output_fn=None``, else an :class:`OutputSelect`. A compiled module
    (``torch.compile``) is unwrapped to the module it compiles: same parameters, same function."""
    check_output_fn(output_fn)
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        model = orig
    return model if output_fn is None else OutputSelect(model, output_fn)


def _batch_like(x: torch.Tensor, n: int) -> torch.Tensor:
    """n copies of x's first sample (zeros of x's per-sample shape if x is empty)."""
    s = x[:1] if x.shape[0] else torch.zeros((1,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    return s.detach().expand((n,) + tuple(s.shape[1:])).contiguous()


def output_dim(model: nn.Module, x: torch.Tensor) -> int:
    """k, the number of outputs per sample, from a state-preserving forward on one sample
    (on a zero-sized batch first when x is empty, else on a zero sample)."""
    with StateGuard(model), torch.no_grad():
        if x.shape[0]:
            out = model_output(run_forward(model, x[:1].detach(), shown=x), 1)
            return max(1, out.numel())
        try:
            out = model(x.detach())
            if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == 0:
                return max(1, math.prod(out.shape[1:]))
        except Exception:  # noqa: BLE001 - some models refuse empty batches: probe one zero sample
            pass
        return max(1, model_output(run_forward(model, _batch_like(x, 1), shown=x), 1).numel())
