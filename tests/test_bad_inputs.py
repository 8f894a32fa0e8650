"""Property-based bad-input suite: invalid calls across the public API and the raw ops must
raise a clear exception (TypeError / ValueError; RuntimeError from a C++ TORCH_CHECK for the
raw ``torch.ops.lazyfast.*``) whose message names the argument — never a crash, a raw
torch/Python error, or a silent answer.

The catalogue ``CASES`` (one entry per API argument) is shared with ``scripts/fuzz_api.py``,
which tries every fixed bad value of every entry and prints the counts. Here hypothesis
draws entries and bad values (derandomized, so CI is reproducible), and one test walks the
fixed values exhaustively.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import lazyfast
from lazyfast.train import TrainConfig, train

D64 = torch.float64
CLEAR = (ValueError, TypeError)
RAW = (ValueError, TypeError, RuntimeError)  # TORCH_CHECK raises RuntimeError


# ----------------------------------------------------------------------------- fixtures (tiny, rebuilt per call)
def two_layer():
    torch.manual_seed(0)
    return lazyfast.TwoLayer(3, 8, 2, dtype=D64)


def mlp():
    torch.manual_seed(0)
    return lazyfast.MLP(3, [5, 4], 2, dtype=D64)


def generic():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


MODELS = {"TwoLayer": two_layer, "MLP": mlp, "generic": generic}


def X(n=5, d=3):
    return torch.randn(n, d, dtype=D64, generator=torch.Generator().manual_seed(n * 10 + d))


def zero_tangents(model):
    return {n: torch.zeros((1,) + tuple(p.shape), dtype=p.dtype) for n, p in model.named_parameters()}


# A generic module declares no input shape: lazyfast cannot check the feature size or whether it
# takes integers. The eNTK and product entry points and Linearized's forward turn the forward's own
# error into a ValueError naming the argument and quoting its shape (lazyfast/_outputs.py,
# run_forward), so those bad values need no documented exception any more.


def psd(n=5):
    J = X(n, 7)
    return J @ J.T


# ----------------------------------------------------------------------------- bad values by kind
_BIG = 10 ** 30
KIND_VALUES: Dict[str, Tuple[Any, ...]] = {
    "pos_int": (0, -1, -_BIG, 2.5, 1.0, "3", None, True, False, float("nan"), [2]),
    "pos_int_or_none": (0, -1, 2.5, "3", True, float("inf")),
    "nonneg_int": (-1, -_BIG, 1.5, "2", None, True, float("nan")),
    "nonneg_int_or_none": (-1, 1.5, "2", True),
    "int": (1.5, "0", None, True, float("nan")),
    "pos_float": (0, 0.0, -1.0, -1e-300, float("nan"), float("inf"), -float("inf"), "1.0", None, True, [1.0]),
    "pos_float_or_none": (0.0, -1.0, float("nan"), float("inf"), "1.0", True),
    "nonneg_float": (-1e-3, -1, float("nan"), float("inf"), "0", None, True),
    "nonzero_float": (0, 0.0, float("nan"), float("inf"), None, True, [1.0]),
    "alpha": (0, -1.0, float("nan"), float("inf"), 1e-200, 1e-160, 1e160, 1e300, "1", None, True),
    "momentum": (-0.1, 1.0, 2.0, float("nan"), float("inf"), "0", None, True),
    "eig_rtol": (-1e-3, 1.0, 2.0, float("nan"), float("inf"), "0.1", True),
    "time": (-1.0, float("nan"), "1", None, [1.0]),
    "bool": ("no", "False", "", 0, 1, 1.0, None, [True]),
    "bool_or_none": ("no", "yes", 0, 1, [True]),
    "choice": ("bogus", "", "TRACE", 3, None, True),
    "output_fn": (1.5, [0], "nope", 7, True, b"logits"),
    "device": ("gpu", 3.5, True, "cuda:x") + (() if torch.cuda.is_available() else ("cuda",)),
    "activation_code": (-1, 5, 99),
    "dtype": (torch.int64, torch.bool, "float64", 64),
    "widths": (5, "5,4", None, [5, 0], [5, -1], [2.5], ["4"], [True]),
    "module": (None, 3, "model", nn.ReLU()),
    "tangents": ("t", None, [], {"bogus": 0}, "wrong-shape", "nan"),
    "path": ("DIR", "MISSING/m.out", 3),
    "callable": (3, "f"),
    # tensors: the value is a variant name, turned into a bad tensor by ``mutate``
    "tensor": ("list", "int", "bool", "dtype", "ndim_up", "ndim_down", "features", "rows", "nan", "inf"),
    "grad_tensor": ("requires_grad",),
}


def mutate(t: torch.Tensor, variant: str, where: int = 0):
    """A bad version of the good tensor ``t``."""
    if variant == "list":
        return t.tolist()
    if variant == "int":
        return t.round().long()
    if variant == "bool":
        return t > 0
    if variant == "dtype":
        return t.float() if t.dtype == D64 else t.double()
    if variant == "ndim_up":
        return t.unsqueeze(-1)
    if variant == "ndim_down":
        return t.reshape(-1)
    if variant == "features":
        return torch.cat([t, t[..., :1]], dim=-1) if t.dim() else t
    if variant == "rows":
        return torch.cat([t, t[:1]], dim=0)
    if variant == "requires_grad":
        return t.clone().requires_grad_()
    if variant in ("nan", "inf"):
        t = t.clone()
        t.view(-1)[where % max(t.numel(), 1)] = float(variant)
        return t
    raise AssertionError(variant)


def resolve(kind: str, value, good=None, where: int = 0):
    """The concrete bad argument for ``value`` of ``kind`` (tensors, paths, tangents)."""
    if kind in ("tensor", "grad_tensor"):
        return mutate(good(), value, where)
    if kind == "path":
        if value == "DIR":
            return tempfile.gettempdir()
        if value == "MISSING/m.out":
            return os.path.join(tempfile.gettempdir(), "lazyfast-no-such-dir", "m.out")
        return value
    if kind == "tangents":
        model = two_layer()
        shapes = {n: p.shape for n, p in model.named_parameters()}
        if value == "wrong-shape":
            return {"hidden.weight": torch.zeros(1, 2, 2, dtype=D64)}
        if value == "nan":
            return {"hidden.weight": torch.full((1,) + tuple(shapes["hidden.weight"]), float("nan"), dtype=D64)}
        if value == "bogus":
            return {"bogus": torch.zeros(1, 3)}
        return value
    return value


@dataclass(frozen=True)
class Case:
    api: str                      # e.g. "TwoLayer(m=)"
    arg: str                      # the name the error message must contain
    kind: str
    call: Callable[[Any], Any]    # concrete bad argument -> the call
    good: Callable[[], Any] = None  # tensors: the good value that ``mutate`` spoils
    skip: Tuple[Any, ...] = ()    # values of the kind that are VALID here (not bad calls)
    accept: Dict[Any, str] = field(default_factory=dict)  # bad values silently accepted, with why
    exc: Tuple[type, ...] = CLEAR
    accept_all: str = ""          # every bad value silently accepted, with why (a pending fix elsewhere)

    def __post_init__(self):  # accept is keyed by repr (values may be unhashable lists)
        object.__setattr__(self, "accept", {repr(k): why for k, why in self.accept.items()})

    def values(self):
        return [v for v in KIND_VALUES[self.kind] if not any(v is s or (type(v) is type(s) and v == s)
                                                              for s in self.skip)]

    def accepted(self, value) -> bool:
        return bool(self.accept_all) or repr(value) in self.accept


def _cases():
    C = []
    add = C.append
    # --- constructors
    for arg, build in (("d", lambda v: lazyfast.TwoLayer(v, 4)), ("m", lambda v: lazyfast.TwoLayer(3, v)),
                       ("k", lambda v: lazyfast.TwoLayer(3, 4, v))):
        add(Case(f"TwoLayer({arg}=)", arg, "pos_int", build))
    add(Case("TwoLayer(activation=)", "activation", "choice", lambda v: lazyfast.TwoLayer(3, 4, activation=v)))
    add(Case("TwoLayer(bias=)", "bias", "bool", lambda v: lazyfast.TwoLayer(3, 4, bias=v)))
    add(Case("TwoLayer(symmetric=)", "symmetric", "bool", lambda v: lazyfast.TwoLayer(3, 4, symmetric=v)))
    add(Case("TwoLayer(scale=)", "scale", "nonzero_float", lambda v: lazyfast.TwoLayer(3, 4, scale=v)))
    add(Case("TwoLayer(init_scale=)", "init_scale", "pos_float", lambda v: lazyfast.TwoLayer(3, 4, init_scale=v)))
    add(Case("TwoLayer(dtype=)", "dtype", "dtype", lambda v: lazyfast.TwoLayer(3, 4, dtype=v)))
    add(Case("MLP(d=)", "d", "pos_int", lambda v: lazyfast.MLP(v, [4])))
    add(Case("MLP(widths=)", "widths", "widths", lambda v: lazyfast.MLP(3, v)))
    add(Case("MLP(k=)", "k", "pos_int", lambda v: lazyfast.MLP(3, [4], v)))
    add(Case("MLP(activation=)", "activation", "choice", lambda v: lazyfast.MLP(3, [4], activation=v)))
    add(Case("MLP(bias=)", "bias", "bool", lambda v: lazyfast.MLP(3, [4], bias=v)))
    add(Case("MLP(parametrization=)", "parametrization", "choice", lambda v: lazyfast.MLP(3, [4], parametrization=v)))
    add(Case("MLP(dtype=)", "dtype", "dtype", lambda v: lazyfast.MLP(3, [4], dtype=v)))
    add(Case("MLP(device=)", "device", "device", lambda v: lazyfast.MLP(3, [4], device=v)))
    add(Case("TwoLayer(device=)", "device", "device", lambda v: lazyfast.TwoLayer(3, 8, device=v)))

    # --- eNTK and products, on the three routes
    for mname, mk in MODELS.items():
        ntk = lambda mk=mk, **kw: lazyfast.empirical_ntk(mk(), kw.pop("x1", X()), **kw)  # noqa: E731
        own = {}  # the forward's own errors are re-raised naming the argument (lazyfast/_outputs.py)
        add(Case(f"empirical_ntk[{mname}](x1=)", "x1", "tensor", lambda v, mk=mk: lazyfast.empirical_ntk(mk(), v),
                 good=X, skip=("rows",), accept=own))
        add(Case(f"empirical_ntk[{mname}](x1=)", "x1", "grad_tensor", lambda v, mk=mk: lazyfast.empirical_ntk(mk(), v),
                 good=X, exc=RAW, accept={"requires_grad": "x is a constant of the kernel (not differentiable in "
                                                           "x): treated as detached"}))
        add(Case(f"empirical_ntk[{mname}](x2=)", "x2", "tensor", lambda v, mk=mk: lazyfast.empirical_ntk(mk(), X(), v),
                 good=lambda: X(4), skip=("rows",)))
        add(Case(f"empirical_ntk[{mname}](mode=)", "mode", "choice", lambda v, ntk=ntk: ntk(mode=v)))
        add(Case(f"empirical_ntk[{mname}](implementation=)", "implementation", "choice",
                 lambda v, ntk=ntk: ntk(implementation=v)))
        add(Case(f"empirical_ntk[{mname}](chunk_size=)", "chunk_size", "pos_int_or_none",
                 lambda v, ntk=ntk: ntk(chunk_size=v)))
        add(Case(f"empirical_ntk[{mname}](memory_budget=)", "memory_budget", "pos_int",
                 lambda v, ntk=ntk: ntk(memory_budget=v)))
        add(Case(f"jvp[{mname}](x=)", "x", "tensor",
                 lambda v, mk=mk: lazyfast.jvp(mk(), v, zero_tangents(mk())), good=X, skip=("rows",)))
        add(Case(f"vjp[{mname}](x=)", "x", "tensor",
                 lambda v, mk=mk: lazyfast.vjp(mk(), v, torch.ones(5, 2, dtype=D64)), good=X,
                 skip=("rows",), accept=own))  # a row mismatch is reported naming the cotangent
        add(Case(f"vjp[{mname}](cotangent=)", "cotangent", "tensor",
                 lambda v, mk=mk: lazyfast.vjp(mk(), X(), v), good=lambda: torch.ones(5, 2, dtype=D64)))
        add(Case(f"ntk_vp[{mname}](v=)", "v", "tensor",
                 lambda v, mk=mk: lazyfast.ntk_vp(mk(), X(), v), good=lambda: torch.ones(5, 2, dtype=D64)))
        add(Case(f"ntk_vp[{mname}](x1=)", "x1", "tensor",
                 lambda v, mk=mk: lazyfast.ntk_vp(mk(), v, torch.ones(5, 2, dtype=D64)), good=X,
                 skip=("rows",), accept=own))
        add(Case(f"empirical_ntk[{mname}](check=)", "check", "choice", lambda v, ntk=ntk: ntk(check=v), skip=(True,)))
        add(Case(f"empirical_ntk[{mname}](output_fn=)", "output_fn", "output_fn", lambda v, ntk=ntk: ntk(output_fn=v)))
    add(Case("jvp[TwoLayer](tangents=)", "tangents", "tangents",
             lambda v: lazyfast.jvp(two_layer(), X(), v)))

    # --- lazy training
    add(Case("LazyModel(model=)", "model", "module", lambda v: lazyfast.LazyModel(v, 1.0)))
    add(Case("LazyModel(alpha=)", "alpha", "alpha", lambda v: lazyfast.LazyModel(two_layer(), v)))
    add(Case("LazyModel(center=)", "center", "bool", lambda v: lazyfast.LazyModel(two_layer(), 1.0, center=v)))
    add(Case("LazyModel.forward(x=)", "x", "tensor", lambda v: lazyfast.LazyModel(two_layer(), 1.0)(v), good=X,
             skip=("rows",)))
    add(Case("Linearized(model=)", "model", "module", lambda v: lazyfast.Linearized(v)))
    add(Case("Linearized(implementation=)", "implementation", "choice",
             lambda v: lazyfast.Linearized(two_layer(), implementation=v)))
    add(Case("Linearized(cache_size=)", "cache_size", "nonneg_int", lambda v: lazyfast.Linearized(two_layer(), cache_size=v)))
    for mname, mk in MODELS.items():
        add(Case(f"Linearized[{mname}].forward(x=)", "x", "tensor", lambda v, mk=mk: lazyfast.Linearized(mk())(v),
                 good=X, skip=("rows",)))
    add(Case("scaled_loss(pred=)", "pred", "tensor",
             lambda v: lazyfast.scaled_loss(v, torch.zeros(5, 2, dtype=D64)), good=lambda: torch.zeros(5, 2, dtype=D64),
             skip=("nan", "inf"),  # a diverged prediction is a value to report, not a bad call
             accept={"dtype": "float32 predictions against float64 targets: the loss promotes (exact)"}))
    add(Case("scaled_loss(target=)", "target", "tensor",
             lambda v: lazyfast.scaled_loss(torch.zeros(5, 2, dtype=D64), v), good=lambda: torch.zeros(5, 2, dtype=D64),
             skip=("int",),  # integer class labels are valid targets... of shape (n,): see ndim_down
             accept={"dtype": "float32 targets with float64 predictions: the loss promotes (exact)",
                     "nan": "scaled_loss is a differentiable loss, not an input check: NaN targets give a NaN loss "
                            "(train() refuses them up front)",
                     "inf": "as for NaN: train() refuses non-finite targets up front"}))
    add(Case("scaled_loss(alpha=)", "alpha", "alpha",
             lambda v: lazyfast.scaled_loss(torch.zeros(5, 2, dtype=D64), torch.zeros(5, 2, dtype=D64), v)))
    add(Case("scaled_loss(loss=)", "loss", "choice",
             lambda v: lazyfast.scaled_loss(torch.zeros(5, 2, dtype=D64), torch.zeros(5, 2, dtype=D64), 1.0, v)))

    # --- solvers
    KGF = lazyfast.KernelGradientFlow
    add(Case("KernelGradientFlow(K=)", "K", "tensor", lambda v: KGF(v, X(5, 2)), good=psd,
             skip=("dtype",)))  # a float32 kernel is a kernel (y is cast to it)
    add(Case("KernelGradientFlow(y=)", "y", "tensor", lambda v: KGF(psd(), v), good=lambda: X(5, 2),
             skip=("ndim_down", "features"),  # (n,) and (n, k) targets are valid for any k on a shared kernel
             accept={"dtype": "y is cast to K's dtype (documented)"}))
    add(Case("KernelGradientFlow(f0=)", "f0", "tensor", lambda v: KGF(psd(), X(5, 2), v), good=lambda: X(5, 2),
             accept={"dtype": "f0 is cast to K's dtype (documented)"}))
    add(Case("KernelGradientFlow(lr=)", "lr", "pos_float", lambda v: KGF(psd(), X(5, 2), lr=v)))
    add(Case("KernelGradientFlow(eig_rtol=)", "eig_rtol", "eig_rtol", lambda v: KGF(psd(), X(5, 2), eig_rtol=v)))
    add(Case("KernelGradientFlow.train_predictions(t=)", "t", "time", lambda v: KGF(psd(), X(5, 2)).train_predictions(v)))
    add(Case("KernelGradientFlow.train_predictions(steps=)", "steps", "nonneg_int_or_none",
             lambda v: KGF(psd(), X(5, 2)).train_predictions(steps=v)))
    add(Case("KernelGradientFlow.test_predictions(K_test=)", "K_test", "tensor",
             lambda v: KGF(psd(), X(5, 2)).test_predictions(v), good=lambda: psd()[:3], skip=("rows",)))
    add(Case("KernelGradientFlow.test_predictions(f0_test=)", "f0_test", "tensor",
             lambda v: KGF(psd(), X(5, 2)).test_predictions(psd()[:3], v), good=lambda: X(3, 2),
             accept={"dtype": "f0_test is added in the predictions' dtype (cast, documented)"}))
    cg = lazyfast.kernel_regression_cg
    Y = lambda: torch.randn(5, 2, dtype=D64, generator=torch.Generator().manual_seed(1))  # noqa: E731
    add(Case("kernel_regression_cg(x=)", "x", "tensor", lambda v: cg(two_layer(), v, Y()), good=X,
             skip=("rows",)))  # a row mismatch is reported naming y
    add(Case("kernel_regression_cg(y=)", "y", "tensor", lambda v: cg(two_layer(), X(), v), good=Y))
    for arg, kind in (("ridge", "nonneg_float"), ("tol", "pos_float"), ("max_iter", "nonneg_int_or_none"),
                      ("chunk_size", "pos_int_or_none"), ("progress", "bool")):
        add(Case(f"kernel_regression_cg({arg}=)", arg, kind, lambda v, arg=arg: cg(two_layer(), X(), Y(), **{arg: v})))
    for arg in ("f0", "x0"):
        add(Case(f"kernel_regression_cg({arg}=)", arg, "tensor",
                 lambda v, arg=arg: cg(two_layer(), X(), Y(), **{arg: v}), good=lambda: torch.zeros(5, 2, dtype=D64)))

    # --- training
    cfg_kinds = (("lr", "pos_float"), ("loss", "choice"), ("steps", "nonneg_int_or_none"),
                 ("batch_size", "pos_int_or_none"), ("momentum", "momentum"), ("lr_decay", "nonneg_float"),
                 ("lr_decay_unit", "choice"), ("alpha", "alpha"), ("seed", "int"), ("log_every", "pos_int"),
                 ("log_unit", "choice"), ("eval_batch_size", "pos_int_or_none"),
                 ("checkpoint_every", "pos_int_or_none"), ("progress", "bool_or_none"))
    for arg, kind in cfg_kinds:
        base = dict(lr=0.1, steps=1)

        def call(v, arg=arg, base=base):
            kw = dict(base)
            kw[arg] = v
            if arg == "steps" and v is None:
                kw["epochs"] = None
            return TrainConfig(**kw).validate()

        skip = (None,) if arg == "alpha" else ()
        add(Case(f"TrainConfig({arg}=)", arg, kind, call, skip=skip))

    def run_train(**kw):
        args = dict(model=two_layer(), x_train=X(6), y_train=torch.zeros(6, 2, dtype=D64),
                    config=TrainConfig(lr=0.1, steps=1))
        args.update(kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return train(args.pop("model"), args.pop("x_train"), args.pop("y_train"), args.pop("config"), **args)

    add(Case("train(x_train=)", "x_train", "tensor", lambda v: run_train(x_train=v), good=lambda: X(6),
             skip=("rows",)))  # a row mismatch is reported naming y_train
    add(Case("train(y_train=)", "y_train", "tensor", lambda v: run_train(y_train=v),
             good=lambda: torch.zeros(6, 2, dtype=D64), skip=("int",),  # (6, 2) ints: see ndim_down for labels
             accept={"dtype": "float32 targets with a float64 model: the loss promotes (exact)"}))
    add(Case("train(x_test=)", "x_test", "tensor", lambda v: run_train(x_test=v, y_test=torch.zeros(4, 2, dtype=D64)),
             good=lambda: X(4), skip=("rows",)))  # a row mismatch is reported naming y_test
    add(Case("train(y_test=)", "y_test", "tensor", lambda v: run_train(x_test=X(4), y_test=v),
             good=lambda: torch.zeros(4, 2, dtype=D64), skip=("int",),
             accept={"dtype": "float32 targets with a float64 model: the loss promotes (exact)"}))
    add(Case("train(config=)", "config", "module", lambda v: run_train(config=v)))
    add(Case("train(model=)", "model", "module", lambda v: run_train(model=v)))
    for arg in ("metrics_path", "checkpoint_path"):
        add(Case(f"train({arg}=)", arg, "path", lambda v, arg=arg: run_train(**{arg: resolve("path", v)})))
    add(Case("train(resume=)", "resume", "bool", lambda v: run_train(resume=v)))
    add(Case("train(callback=)", "callback", "callable", lambda v: run_train(callback=v)))

    # --- raw ops (C++ TORCH_CHECK; values such as NaN are the Python wrappers' job)
    if lazyfast._ext._C is not None:
        ops = torch.ops.lazyfast
        A = lambda: X(8, 3)  # noqa: E731
        B = lambda: X(2, 8)  # noqa: E731
        raw_accept = {"nan": "raw ops check structure (shape, dtype, device), not values: the Python wrappers "
                             "lazyfast.two_layer.* check NaN/inf (docs/contracts.md)",
                      "inf": "as for NaN"}
        add(Case("ops.two_layer_ntk(x1=)", "x1", "tensor", lambda v: ops.two_layer_ntk(v, None, A(), None, B(), 1.0, 1, False),
                 good=X, skip=("rows",), exc=RAW, accept=raw_accept))
        add(Case("ops.two_layer_ntk(A=)", "A", "tensor", lambda v: ops.two_layer_ntk(X(), None, v, None, B(), 1.0, 1, False),
                 good=A, skip=("rows",), exc=RAW, accept=raw_accept))
        add(Case("ops.two_layer_ntk(B=)", "B", "tensor", lambda v: ops.two_layer_ntk(X(), None, A(), None, v, 1.0, 1, False),
                 good=B, skip=("rows",), exc=RAW, accept=raw_accept))
        add(Case("ops.two_layer_ntk(activation=)", "activation", "activation_code",
                 lambda v: ops.two_layer_ntk(X(), None, A(), None, B(), 1.0, v, False), exc=RAW))
        add(Case("ops.two_layer_jvp(dA=)", "dA", "tensor",
                 lambda v: ops.two_layer_jvp(X(), A(), None, B(), 1.0, 1, v, None, None),
                 good=lambda: X(24, 1).reshape(1, 8, 3), skip=("rows",), exc=RAW, accept=raw_accept))
        add(Case("ops.two_layer_vjp(r=)", "r", "tensor", lambda v: ops.two_layer_vjp(X(), A(), None, B(), 1.0, 1, v),
                 good=lambda: X(5, 2), exc=RAW, accept=raw_accept))
        add(Case("ops.two_layer_ntk_vp(v=)", "v", "tensor",
                 lambda v: ops.two_layer_ntk_vp(X(), None, A(), None, B(), 1.0, 1, v),
                 good=lambda: X(5, 2), exc=RAW, accept=raw_accept))
        add(Case("ops.gram(j2=)", "j2", "tensor", lambda v: ops.gram(X(4, 6), v, False), good=lambda: X(3, 6),
                 skip=("rows",), exc=RAW, accept=raw_accept))
    return C


CASES = _cases()


def outcome(case: Case, value, where: int = 0):
    """('clear' | 'unclear' | 'accepted', detail) for one bad call."""
    arg = resolve(case.kind, value, case.good, where) if case.kind in ("tensor", "grad_tensor", "path",
                                                                       "tangents") else value
    try:
        case.call(arg)
    except case.exc as e:
        msg = str(e)
        if case.arg in msg:
            return "clear", f"{type(e).__name__}: {msg.splitlines()[0][:120]}"
        return "unclear", f"{type(e).__name__} without {case.arg!r}: {msg.splitlines()[0][:120]}"
    except Exception as e:  # noqa: BLE001 - this IS the classification
        return "unclear", f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return "accepted", case.accept_all or case.accept.get(repr(value), "")


# ----------------------------------------------------------------------------- tests
pytestmark = pytest.mark.usefixtures("one_thread")

_DRAW = st.sampled_from([(c, v) for c in CASES for v in c.values() if not c.accepted(v)])


def _assert_clear(case, value, where=0):
    kind, detail = outcome(case, value, where)
    assert kind == "clear", f"{case.api} with bad {case.arg}={value!r}: {kind}: {detail}"


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(pair=_DRAW, where=st.integers(0, 50))
def test_bad_calls_raise_a_clear_error_naming_the_argument(pair, where):
    case, value = pair
    _assert_clear(case, value, where)


_NUMERIC = [c for c in CASES if c.kind in ("pos_int", "nonneg_int", "pos_float", "nonneg_float") and not c.accept_all]


@settings(max_examples=80, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_generated_numbers_out_of_range(data):
    """Numbers hypothesis generates outside each argument's range (not only the catalogue's)."""
    case = data.draw(st.sampled_from(_NUMERIC))
    if case.kind == "pos_int":
        v = data.draw(st.one_of(st.integers(max_value=0), st.floats(allow_nan=True, allow_infinity=True)))
    elif case.kind == "nonneg_int":
        v = data.draw(st.one_of(st.integers(max_value=-1), st.floats(allow_nan=True)))
    elif case.kind == "pos_float":
        v = data.draw(st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("inf")),
                                st.text(max_size=3)))
    else:
        v = data.draw(st.one_of(st.floats(max_value=-1e-300), st.just(float("nan")), st.text(max_size=3)))
    _assert_clear(case, v)


def test_every_catalogued_bad_call():
    """All fixed bad values of every entry (what scripts/fuzz_api.py counts): none unclear,
    and the only silent accepts are the documented ones."""
    bad = []
    for case in CASES:
        for v in case.values():
            kind, detail = outcome(case, v)
            if case.accepted(v):
                continue  # documented accept (or a pending fix in another module), counted by the script
            if kind != "clear":
                bad.append(f"{case.api} {case.arg}={v!r}: {kind}: {detail}")
    assert not bad, "\n".join(bad)
