"""Lazy (α-scaled) models, exact linearizations, and the authors' CNN surrogate.

The paper (Chizat, Oyallon & Bach, §2) trains the scaled model αh(w) on the
objective R(αh(w))/α². Lazy training needs h(w0) = 0; two ways to get it:

* **centering** (:class:`LazyModel` with ``center=True``): h(w) = f(w, ·) − f(w0, ·)
  with a frozen copy of the initial model, as in the authors' CNN code;
* **symmetrized init** (``TwoLayer(..., symmetric=True)``): f(w0, ·) = 0 already,
  so ``center=False`` needs no copy.

:class:`Linearized` is the tangent model h̄(w) = f(w0, ·) + J(w0, ·)(w − w0): its
forward is one JVP at w0 and its backward one VJP at w0 — either through the public
:func:`lazyfast.ntk.jvp` / :func:`lazyfast.ntk.vjp` (fused kernels serve ``TwoLayer``
and MLPs wherever they are compiled, ``torch.func`` any other module), or, for a batch
that is reused (full-batch training), through autograd graphs of the linearization at
w0 kept in memory, which makes a step cost about as much as a standard training step.

:class:`FrozenPatternNet` is *not* the linearization: it is the authors' "lazy
net" surrogate for CNNs (ReLU and max-pool masks of the initial network, current
weights). It has the value and Jacobian of the network at w0 but differs from h̄
at second order in w − w0.
"""
from __future__ import annotations

import copy
import math
import weakref
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call

from lazyfast import _ext, ntk as _ntk
from lazyfast._engine import two_layer
from lazyfast._engine.generic import math_attention as _math_attention
from lazyfast._engine.outputs import ModelForwardError, model_output, run_forward, with_output
from lazyfast._engine.uses import AliasGuard, _tensors, merge_spans, storage_key
from lazyfast._validation import (IMPLEMENTATIONS_OF, check_alpha, check_bool, check_implementation, check_input, check_int,
                                  check_module, model_param_info)

LOSSES = ("square", "cross_entropy")

__all__ = [
    "LINEARIZED_IMPLEMENTATIONS", "LazyModel", "Linearized", "FrozenPatternNet", "frozen_copy", "square_loss",
    "cross_entropy_loss", "scaled_loss", "LOSSES",
]


# ----------------------------------------------------------------------------- helpers
def _deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, with torch's refusal to copy a non-leaf tensor held by the model (a view
    of a parameter made with grad on, e.g. ``self.wT = self.fc.weight.T`` in ``__init__``) turned into a
    ValueError that names the cause and the fix."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as e:
        if "deepcopy protocol" not in str(e):
            raise
        held = [name for name, v in ((f"{mn + '.' if mn else ''}{a}", v) for mn, m in model.named_modules()
                                     for a, v in vars(m).items())
                if isinstance(v, torch.Tensor) and not v.is_leaf]
        raise ValueError(
            "model is copied (Linearized, LazyModel and the frozen-pattern models keep its parameters at w0), but it "
            "holds a tensor computed from "
            f"a parameter outside forward ({', '.join(held) or 'a non-leaf tensor'}: e.g. self.wT = self.fc.weight.T "
            "in __init__), which cannot be copied and would not follow the copy's parameters. Compute it inside "
            "forward() (x @ self.fc.weight.T)") from e


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode whose parameters do not require grad."""
    check_module(model)
    m0 = _deepcopy(model)
    for p in m0.parameters():
        p.requires_grad_(False)
    return m0.eval()


@contextmanager
def _trainable(module: nn.Module, names: List[str]):
    """Temporarily marks the (frozen) parameters ``names`` of ``module`` as requiring grad,
    because the public JVP/VJP differentiate with respect to ``requires_grad=True``
    parameters. Only used where autograd is not recording (inside ``autograd.Function``)."""
    named = dict(module.named_parameters())
    params = [named[n] for n in names]
    old = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield module
    finally:
        for p, r in zip(params, old):
            p.requires_grad_(r)


# modules whose output depends on train/eval mode (batch statistics, random masks)
_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd,
                   nn.modules.instancenorm._InstanceNorm)


def mode_dependent_modules(model: nn.Module) -> List[str]:
    """Names (and types) of the submodules of ``model`` in training mode whose output there
    differs from eval mode: BatchNorm, Dropout, InstanceNorm with running statistics."""
    out = []
    for name, m in model.named_modules():
        if not m.training or not isinstance(m, _MODE_DEPENDENT):
            continue
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats:
            continue
        out.append(f"{name or '<model>'} ({type(m).__name__})")
    return out


def _rng_states(device: torch.device):
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu, cuda


def _set_rng_states(states, device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def _as_rows(out: torch.Tensor, n: int) -> torch.Tensor:
    """Model output (n, ...) → (n, k), also for n = 0 (where reshape(0, -1) is ambiguous)."""
    if out.dim() == 1:
        return out.reshape(n, 1)
    if n == 0:
        return out.reshape(0, math.prod(out.shape[1:]))
    return out.reshape(n, -1)


def _check_loss_name(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


# ----------------------------------------------------------------------------- losses
def square_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """R(f) = (1/2n) Σ_i ‖f_i − y_i‖² (sum over outputs, mean over samples).

    This is the normalization of DESIGN §1.4 and of the authors' two-layer code; with
    it, full-batch gradient flow on a linear model is f_t = y + exp(−ηtK/n)(f_0 − y).

    Args:
        pred: (n, k) predictions. target: (n, k) targets, or (n,) integer class labels
            (turned into one-hot targets, as the authors do for CIFAR).
    """
    target = _as_regression_target(pred, target, "target")
    n = max(pred.shape[0], 1)
    return 0.5 * (pred - target).pow(2).sum() / n


def cross_entropy_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``pred`` (n, k) against integer labels ``target`` (n,)."""
    if target.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8):
        if target.dim() != 1 or target.shape[0] != pred.shape[0]:
            raise ValueError(f"target must have shape ({pred.shape[0]},) of class labels, got {tuple(target.shape)}")
        return F.cross_entropy(pred, target.long())
    raise TypeError(f"cross-entropy needs integer class labels as target, got dtype {target.dtype}")


def _as_regression_target(pred: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if not target.is_floating_point():
        if target.dim() != 1 or target.shape[0] != pred.shape[0]:
            raise ValueError(f"{name} with integer labels must have shape ({pred.shape[0]},), "
                             f"got {tuple(target.shape)}")
        return F.one_hot(target.long(), pred.shape[1]).to(pred.dtype)
    if target.dim() == 1 and pred.dim() == 2 and pred.shape[1] == 1:
        target = target.unsqueeze(1)
    if target.shape != pred.shape:
        raise ValueError(f"{name} must have the predictions' shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    return target


def scaled_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, loss: str = "square") -> torch.Tensor:
    """The paper's scaled objective R(α·h)/α², given ``pred = α·h`` (a :class:`LazyModel` output).

    The 1/α² keeps the predictor dynamics of order one as α grows (paper §2).

    Args:
        pred: (n, k) the scaled output α·h(w, x).
        target: (n, k) float targets or (n,) integer labels.
        alpha: α, finite, > 0, with α² and 1/α² representable (:func:`lazyfast._validation.check_alpha`).
        loss: ``"square"`` (:func:`square_loss`) or ``"cross_entropy"``.
    """
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"pred must be a torch.Tensor, got {type(pred).__name__}")
    if not pred.is_floating_point() or pred.dim() != 2:
        raise ValueError(f"pred must be a floating-point (n, k) tensor, got {pred.dtype} of shape {tuple(pred.shape)}")
    alpha = check_alpha(alpha, "alpha", pred.dtype)
    _check_loss_name(loss)
    r = square_loss(pred, target) if loss == "square" else cross_entropy_loss(pred, target)
    return r / (alpha * alpha)


# ----------------------------------------------------------------------------- linearized model
LINEARIZED_IMPLEMENTATIONS = IMPLEMENTATIONS_OF["Linearized"]


def _call_at(model0: nn.Module, subs: Dict[str, torch.Tensor], x: torch.Tensor, guard=AliasGuard):
    """``model0`` (the frozen copy) run with the parameters ``subs`` substituted by name, refusing a
    use of one of them through an alias made before the call (``self.ws = [fc.weight]``), as every
    other path does (:class:`lazyfast._engine.uses.AliasGuard`): such a use would silently see w0."""
    named = dict(model0.named_parameters())
    storages, spans = {}, []
    for n in subs:
        key = storage_key(named[n])
        if key is not None and named[n].numel():
            storages.setdefault(key, n)
            nbytes = named[n].untyped_storage().nbytes()
            spans.append((key[2], key[2] + nbytes))
        elif named[n].numel():
            spans = None  # a parameter without plain storage: no address filter
    allowed = list(subs.values()) + [p for n, p in named.items() if n not in subs]
    with guard(storages, allowed, merge_spans(spans) if spans else None):
        return functional_call(model0, subs, (x,), strict=False)


class _CachedLinearization:
    """J(w0, x) for one fixed input batch, as reusable autograd graphs (generic, any module).

    Built once per batch: the forward at w0 with autograd on, and its backward with
    ``create_graph=True`` as a function of a dummy cotangent u (g(u) = J(w0, x)ᵀu is
    linear in u). Then, every training step,

    * VJP: J(w0, x)ᵀr = backprop of the stored forward graph (one backward pass);
    * JVP: J(w0, x)δ = ∂⟨g(u), δ⟩/∂u, the backprop of the stored backward graph
      (the "double-VJP" trick) — no forward pass at w0 is recomputed.

    So a step costs about one forward and one backward pass, like a standard step, at the
    price of keeping the activations at w0 of this batch in memory.
    """

    def __init__(self, model0: nn.Module, names: List[str], x: torch.Tensor):
        named = dict(model0.named_parameters())
        self.w0 = [named[n].detach().requires_grad_(True) for n in names]
        with torch.enable_grad():
            out = _call_at(model0, dict(zip(names, self.w0)), x)
            out = _as_rows(out, x.shape[0])
            self.u = torch.zeros_like(out, requires_grad=True)
            g = torch.autograd.grad(out, self.w0, grad_outputs=self.u, create_graph=True, allow_unused=True)
        self.out = out
        self.primal = out.detach()
        # keep the entries of g that depend on u (a parameter unused by the forward has none)
        self.g_index = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        self.g = [g[i] for i in self.g_index]

    def jvp(self, deltas: List[torch.Tensor]) -> torch.Tensor:
        if not self.g:
            return torch.zeros_like(self.primal)
        with torch.enable_grad():
            (res,) = torch.autograd.grad(self.g, self.u, grad_outputs=[deltas[i] for i in self.g_index],
                                         retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.primal) if res is None else res

    def vjp(self, r: torch.Tensor) -> List[torch.Tensor]:
        with torch.enable_grad():
            grads = torch.autograd.grad(self.out, self.w0, grad_outputs=r, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for w, g in zip(self.w0, grads)]


def _composite(func, args, kwargs):
    x = args[0] if args else kwargs["input"]
    xp = x.detach()
    if func is F.hardsigmoid:
        slope = torch.ops.aten.hardsigmoid_backward(torch.ones_like(xp), xp)
        return F.hardsigmoid(xp) + (x - xp) * slope
    dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)

    def glu(z):
        a, b = z.chunk(2, dim)
        return a * torch.sigmoid(b)

    return F.glu(xp, dim) + (glu(x) - glu(xp))  # F.glu's value; the tangent of a·sigmoid(b)


_LAYER_OPS = (F.linear, F.conv1d, F.conv2d, F.conv3d)


def _tangent_free_input(func, args, kwargs):
    """``F.linear`` / ``F.conv*d`` whose input carries no tangent (the network's own input, or any
    tensor that does not depend on the parameters) and whose weight is dual: (value, tangent) as two
    calls, f(x, W0, b0) and f(x, ΔW, Δb), or None for any other call. torch's forward-mode formula
    for these ops materializes the missing input tangent as zeros and multiplies it by W0: one product
    of the layer computed for nothing (tests/test_bench_linearized.py counts it)."""
    args, kwargs = list(args), dict(kwargs)
    x = args.pop(0) if args else kwargs.pop("input", None)
    w = args.pop(0) if args else kwargs.pop("weight", None)
    b = args.pop(0) if args else kwargs.pop("bias", None)
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or fwad.unpack_dual(x).tangent is not None:
        return None
    wp, wt = fwad.unpack_dual(w)
    if wt is None:
        return None
    bp, bt = fwad.unpack_dual(b) if isinstance(b, torch.Tensor) else (None, None)
    return func(x, wp, bp, *args, **kwargs), func(x, wt, bt, *args, **kwargs)


class _DualGuard(AliasGuard):
    """The dual pass's one torch-function mode: parameter aliases are refused (:class:`AliasGuard`);
    the two activations whose forward-mode formula has no derivative of its own
    (aten::hardsigmoid_backward, aten::glu_jvp: the backward of the tangent would fail; found by
    trying every common layer op) run through ops whose every derivative exists, with the same value: ``F.hardsigmoid`` as hardsigmoid(x̄) + (x − x̄)·s, x̄ = x
    detached and s = aten::hardsigmoid_backward(1, x̄) (torch's own slope, so the tangent t·s is
    autograd's); ``F.glu`` as glu(x̄) + (a·sigmoid(b) at x − the same at x̄); and a linear or
    convolutional layer on an input without a tangent computes ΔW·x alone as its tangent
    (:func:`_tangent_free_input`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.hardsigmoid or func is F.glu:
            return _composite(func, args, kwargs or {})
        if func in _LAYER_OPS:
            split = _tangent_free_input(func, args, kwargs or {})
            if split is not None:
                for t in list(_tensors(args)) + list(_tensors(kwargs or {})):
                    self._arg(t)
                out = fwad.make_dual(*split)
                self._made(out)
                return out
        return super().__torch_function__(func, types, args, kwargs)


class _DualPass:
    """f(w0, x) and J(w0, x)·δ from ONE forward pass of the network at w0 whose parameters are
    forward-mode dual numbers (w0, δ): every op propagates its tangent next to its value (a layer
    computes W0·t + δW·a beside W0·a; an elementwise op its derivative times t), so the tangent costs
    about one extra forward, and the primal comes with it. The tangent's autograd graph (built with δ
    as the leaf; w0 needs no gradient) is the linearized network: its backward, J(w0, x)ᵀ·r, is one
    ordinary backward pass through it, using the activations of this same forward. Attention runs by
    its math backend here (the fused kernels have no forward-mode formula); hardsigmoid and GLU by
    equivalent composites (:class:`_DualGuard`)."""

    def __init__(self, lin: "Linearized", x: torch.Tensor, deltas: List[torch.Tensor], graph: bool = True):
        initial = lin._initial
        self.like = [initial[n] for n in lin._names]
        # δ enters the graph by its gradient edge, not as a tensor this object keeps: a δ that no op
        # saves (a linear layer's ΔW·a keeps a, not ΔW) is freed after the forward
        self.edges = None
        if graph:
            deltas = [d if d.requires_grad else d.detach().requires_grad_() for d in deltas]
            self.edges = [get_gradient_edge(d) for d in deltas]
        names, n = lin._names, x.shape[0]

        def at(*duals):
            subs = dict(zip(names, duals))
            return model_output(run_forward(lambda inp: _call_at(lin.model0, subs, inp, guard=_DualGuard), x), n)

        with torch.set_grad_enabled(graph), _math_attention():
            if getattr(lin, "_functorch_ok", True):
                try:
                    # torch.func.jvp: the same dual numbers, with less held during the forward than a
                    # bare forward_ad.dual_level (measured in benchmarks/results/linearized_models_cpu.json)
                    primal, tangent = torch.func.jvp(at, tuple(initial[k] for k in names), tuple(deltas))
                except (RuntimeError, NotImplementedError, ModelForwardError):
                    # what torch.func cannot transform (an autograd.Function without setup_context, ...):
                    # forward_ad directly, for this call and every later one
                    lin._functorch_ok = False
            if not getattr(lin, "_functorch_ok", True):
                with fwad.dual_level():
                    out = at(*(fwad.make_dual(initial[k], t) for k, t in zip(names, deltas)))
                    primal, tangent = fwad.unpack_dual(out)
        del deltas
        self.primal = _as_rows(primal.detach(), x.shape[0])
        self.tangent = None if tangent is None else _as_rows(tangent, x.shape[0])

    def vjp(self, r: torch.Tensor) -> Optional[List[torch.Tensor]]:
        if self.edges is None or self.tangent is None or not self.tangent.requires_grad:
            return [torch.zeros_like(w) for w in self.like]
        grads = torch.autograd.grad(self.tangent, self.edges, grad_outputs=r, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for w, g in zip(self.like, grads)]


def _not_implemented(e: BaseException) -> bool:
    return isinstance(e, NotImplementedError) or "not implemented" in str(e) or "forward AD" in str(e)


class _LinearizedFunction(torch.autograd.Function):
    """out = J(w0, x)·(w − w0), backward = J(w0, x)ᵀ·grad (exact VJP at w0).

    ``cached`` is a :class:`_CachedLinearization` of this batch, a :class:`_DualPass` the caller
    ran (primal and tangent in one forward; the second output is then the primal, else empty), or
    None to go through the public :func:`lazyfast.ntk.jvp` / :func:`lazyfast.ntk.vjp` (fused
    kernels where compiled).
    """

    @staticmethod
    def forward(ctx, lin: "Linearized", x: torch.Tensor, cached, *params: torch.Tensor):
        names = lin._names
        initial = lin._initial
        ctx.dual = None
        if isinstance(cached, _DualPass):  # computed by the caller (forward-mode AD is off in here)
            ctx.dual, cached = cached, None
            ctx.lin, ctx.cached = lin, None
            ctx.save_for_backward(x)
            t, primal = ctx.dual.tangent, ctx.dual.primal
            out = torch.zeros_like(primal) if t is None else t.detach()
            ctx.mark_non_differentiable(primal)
            return out, primal
        deltas = [p - initial[name] for name, p in zip(names, params)]  # the dual pass took its own
        if cached is not None:
            try:
                out = cached.jvp(deltas)
            except (RuntimeError, NotImplementedError) as e:
                # the double-VJP needs the derivative of every backward op (aten::hardsigmoid_backward
                # has none): this batch takes the JVP path, exactly, and is not cached again
                if not _not_implemented(e):
                    raise
                lin._uncacheable(x)
                cached = None
        if cached is None:
            try:
                with _trainable(lin.model0, names), _math_attention():
                    out = _ntk.jvp(lin.model0, x, {n: d.unsqueeze(0) for n, d in zip(names, deltas)})[0]  # T = 1
            except (RuntimeError, NotImplementedError) as e:
                if not _not_implemented(e):
                    raise
                raise RuntimeError(
                    "Linearized: the model uses an op that has neither a forward-mode derivative (dual and JVP "
                    f"paths) nor a double derivative (cached path): {str(e).strip().splitlines()[0]}. Replace "
                    "that op by its composite definition, or register its derivative with torch.library") from e
        ctx.lin, ctx.cached = lin, cached
        ctx.save_for_backward(x)
        empty = out.new_empty(0)  # the second output: no primal on this path
        ctx.mark_non_differentiable(empty)
        return out, empty

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_primal=None):
        (x,) = ctx.saved_tensors
        lin, cached = ctx.lin, ctx.cached
        if ctx.needs_input_grad[1]:
            raise RuntimeError("Linearized does not differentiate with respect to its input x; "
                               "pass x with requires_grad=False")
        grads = None
        if ctx.dual is not None:
            try:
                grads = ctx.dual.vjp(grad_out.contiguous())
            except (RuntimeError, NotImplementedError) as e:
                # a forward-mode formula without a derivative of its own: this step's VJP is recomputed
                # by the VJP path (exact), and the model takes the JVP/VJP path from now on
                if not _not_implemented(e):
                    raise
                lin._dual_ok = False
            ctx.dual = None
            if grads is not None:
                return (None, None, None) + tuple(g if ctx.needs_input_grad[3 + i] else None
                                                  for i, g in enumerate(grads))
        if cached is not None:
            grads = cached.vjp(grad_out.contiguous())
        else:
            with _trainable(lin.model0, lin._names):
                gd = _ntk.vjp(lin.model0, x, grad_out.contiguous())
            grads = [gd[name] for name in lin._names]
        return (None, None, None) + tuple(g if ctx.needs_input_grad[3 + i] else None for i, g in enumerate(grads))


_NO_LINEARIZATION = object()  # a batch whose linearization cannot be cached (see Linearized._uncacheable)


class _CacheEntry:
    """One batch's cached primal (and linearization). The batch is held by a weak reference: the
    cache never keeps an input alive (mini-batch SGD makes a new batch every step; holding the last
    ``cache_size`` of them would cost their memory for nothing), and an entry whose batch is gone
    matches nothing."""

    __slots__ = ("_ref", "key", "primal", "linearization", "hits")

    def __init__(self, x, key, primal):
        self._ref = weakref.ref(x)
        self.key, self.primal, self.linearization, self.hits = key, primal, None, 0

    @property
    def x(self) -> Optional[torch.Tensor]:
        return self._ref()


class Linearized(nn.Module):
    r"""The tangent model h̄(w, x) = f(w0, x) + J(w0, x)(w − w0), trainable by any optimizer.

    ``self.model`` holds the trainable parameters w (a deep copy of ``model``, starting
    at w0); ``self.model0`` is a frozen copy at w0 (its parameters do not require grad).
    The output is exact and the gradients are exact VJPs at w0. Ways to compute them
    (``implementation``):
    * ``"dual"`` — one forward pass of the network at w0 with forward-mode dual parameters
      (w0, w − w0) gives f(w0, x) and J(w0, x)(w − w0) together (:class:`_DualPass`); the
      backward is one ordinary backward pass through that pass's tangent graph, with the
      activations it already holds. A step costs one forward with its tangent (about 3
      products per layer: W0·a, W0·t, ΔW·a) and one backward (2), against 1 + 2 for a
      standard step: about 5/3 of a standard step where products dominate (measured in
      ``benchmarks/results/linearized_models_cpu.json``). Attention runs by SDPA's math
      backend in this pass; hardsigmoid and GLU by equivalent composites. A model with an
      op that has no forward-mode formula takes, for that call, the double-VJP of
      ``"cached"`` (reverse mode only), and the other paths from then on.
    * ``"products"`` (0.1: ``"ntk"``) — every call does one JVP at w0 with the single tangent w − w0 and its
      backward one VJP at w0, through the public :func:`lazyfast.ntk.jvp` /
      :func:`lazyfast.ntk.vjp`: fused kernels serve ``TwoLayer`` (and MLPs) wherever they
      are compiled, with their bounded memory; ``torch.func`` serves any other module.
      Each call re-runs the network at w0 inside the JVP and the VJP.
    * ``"cached"`` — for an input batch seen before, the linearization at w0 is kept as
      autograd graphs (see :class:`_CachedLinearization`): a step then costs about one
      forward and one backward pass, like a standard training step, but the batch's
      activations at w0 stay in memory (``cache_size`` batches at most).
    * ``"auto"`` (default) — ``"products"`` for a ``TwoLayer`` served by the compiled kernels
      (their fused JVP + VJP cost less than a standard training step at n = 4096,
      m = 65536: measured in ``benchmarks/results/engine_cpu.json``, ``python benchmarks/engine_cpu.py``);
      otherwise ``"cached"`` from the second time a batch is seen (full-batch training, a
      fixed evaluation set) and ``"dual"`` for batches seen once (mini-batch SGD), so caching
      never costs work that is thrown away.

    The primal f(w0, x) is cached for the last ``cache_size`` input tensors, matched by
    identity and version (an in-place edit of x invalidates it), and by the version of w0.

    Only trainable parameters (``requires_grad=True``) of ``model`` are linearized;
    frozen parameters and buffers stay fixed at their initial values. Inputs are
    constants: gradients with respect to x are not provided.

    The linearized function is the network in eval mode (running statistics, no dropout):
    a ``model`` in training mode that holds BatchNorm / Dropout / tracked InstanceNorm
    raises ``ValueError`` (call ``model.eval()`` first), instead of silently linearizing a
    function other than the one the caller trains. An empty batch gives an (0, k) output;
    under ``torch.inference_mode()`` each call is one JVP (no autograd graph is cached).

    Args:
        model: a network mapping (n, ...) → (n, k); not modified.
        implementation: ``"auto"``, ``"dual"``, ``"cached"`` or ``"products"`` (see above).
        output_fn: for a model whose output is a tuple, dict or ModelOutput, which tensor
            is the output (a key or attribute such as ``"logits"``, an index, or a callable),
            as in :func:`lazyfast.empirical_ntk`.
        cache_size: how many input batches keep their primal (and, for ``"cached"``/
            ``"auto"``, their linearization) cached; 0 disables caching.

    Shapes: input (n, ...) → output (n, k).
    """

    def __init__(self, model: nn.Module, *, implementation: str = "auto", cache_size: int = 2, output_fn=None):
        super().__init__()
        check_module(model)
        model = with_output(model, output_fn)  # a tuple / dict / ModelOutput seen through output_fn
        implementation = check_implementation(implementation, "Linearized")
        check_int(cache_size, "cache_size", minimum=0)
        if implementation == "cached" and cache_size == 0:
            raise ValueError("implementation='cached' needs cache_size >= 1")
        dependent = mode_dependent_modules(model)
        if dependent:
            raise ValueError(
                "Linearized linearizes one fixed function, but model is in training mode with modules whose "
                f"output depends on the mode: {', '.join(dependent)}. Call model.eval() first: Linearized then "
                "linearizes the eval-mode network (running statistics, no dropout), as documented")
        self.implementation = implementation
        self.model = _deepcopy(model)
        self._names: List[str] = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if not self._names:
            raise ValueError("model has no trainable parameters (requires_grad=True) to linearize")
        # Frozen copy at w0; only the parameters in ``_names`` are ever toggled on for the
        # JVP/VJP, so parameters frozen in ``model`` stay constants of the linearization.
        self.model0 = frozen_copy(model)
        self._dual_ok = True  # False once an op without a forward-mode formula was met (JVP/VJP path)
        self.cache_size = cache_size
        self._cache: List[_CacheEntry] = []
        for attr in ("in_features", "out_features", "symmetric"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    @property
    def _initial(self) -> Dict[str, torch.Tensor]:
        return dict(self.model0.named_parameters())

    def _w0_version(self) -> tuple:
        # In-place writes to w0 (load_state_dict, copy_) bump these counters.
        return tuple(p._version for p in self.model0.parameters())

    def __getstate__(self):
        # deepcopy / pickle: the cache holds autograd graphs (not copyable) and is rebuilt on use
        state = dict(super().__getstate__())
        state["_cache"] = []
        return state

    def _apply(self, fn, *args, **kwargs):
        self._cache = []  # device/dtype moves invalidate the cached primals
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        """Sets training mode; the frozen initial copy always stays in eval mode."""
        super().train(mode)
        if self.model0 is not None:
            self.model0.eval()
        return self

    def clear_cache(self) -> None:
        """Drops the cached primals and linearizations."""
        self._cache = []

    def _uncacheable(self, x: torch.Tensor) -> None:
        """This batch's cached linearization cannot run (an op without a double derivative): the
        batch keeps its primal and takes the JVP path from now on."""
        for e in self._cache:
            if e.x is x:
                e.linearization = _NO_LINEARIZATION

    def _entry(self, x: torch.Tensor, primal: bool = True) -> Optional[_CacheEntry]:
        """The cache entry of batch ``x`` (found, or made; None when nothing is cached). With
        ``primal=False`` a new entry's f(w0, x) is left to the call (the dual pass computes it)."""
        if x.is_inference():
            return None  # an inference tensor has no version counter to key the cache on
        key = (x._version, self._w0_version())
        self._cache = [e for e in self._cache if e.x is not None]  # batches dropped by the caller
        for i, e in enumerate(self._cache):
            if e.x is x and e.key == key:
                e.hits += 1
                if i:  # most recently used first
                    self._cache.insert(0, self._cache.pop(i))
                if primal and e.primal is None:
                    e.primal = self._primal(x)
                return e
        if not self.cache_size or torch.is_inference_mode_enabled():
            return None  # (inference tensors must not outlive the inference_mode block in the cache)
        e = _CacheEntry(x, key, self._primal(x) if primal else None)
        self._cache = [e] + self._cache[: self.cache_size - 1]
        return e

    def _primal(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _as_rows(model_output(run_forward(self.model0, x), x.shape[0]), x.shape[0])

    def primal(self, x: torch.Tensor) -> torch.Tensor:
        """f(w0, x), (n, k), cached for the last ``cache_size`` input tensors."""
        e = self._entry(x)
        if e is not None:
            return e.primal
        return self._primal(x)

    def _fused_serves(self) -> bool:
        """True when the compiled two-layer JVP/VJP kernels serve ``model0`` as it is (all
        parameters linearized, a kernel dtype, kernels built for its device)."""

        # the trainable copy has model0's class, forward and hooks, and the caller's requires_grad
        # flags: the fused route applies to model0 exactly when two_layer.fused_applicable accepts it
        if not two_layer.fused_applicable(self.model) or len(self._names) != len(list(self.model0.parameters())):
            return False
        p = next(self.model0.parameters())
        built = _ext.HAS_CPU_KERNELS if p.device.type == "cpu" else (p.device.type == "cuda" and _ext.HAS_CUDA_KERNELS)
        return built and p.dtype in (torch.float32, torch.float64)

    def _linearization(self, e: Optional[_CacheEntry], x: torch.Tensor):
        """How this call computes J(w0, x)·δ: a :class:`_CachedLinearization`, ``"dual"`` (one
        :class:`_DualPass`) or None (the public JVP / VJP)."""
        if self.implementation == "products" or torch.is_inference_mode_enabled():
            return None  # under torch.inference_mode no autograd graph can be built: one JVP
        if self.implementation == "auto" and self._fused_serves():
            return None  # the fused JVP + VJP cost less than a standard step: nothing to cache
        if self.implementation in ("auto", "cached") and e is not None and e.linearization is not _NO_LINEARIZATION:
            if e.linearization is None and (self.implementation == "cached" or e.hits >= 1):
                e.linearization = _CachedLinearization(self.model0, self._names, e.x)
            if e.linearization is not None:
                return e.linearization
        if self.implementation in ("auto", "dual"):
            if getattr(self, "_dual_ok", True):
                return "dual"
            if e is None or e.linearization is not _NO_LINEARIZATION:
                # a model with an op without a forward-mode formula: reverse mode only (the double-VJP),
                # built for this call
                return _CachedLinearization(self.model0, self._names, x)
        return None

    def _params(self) -> List[torch.Tensor]:
        params = [p for n, p in self.model.named_parameters() if p.requires_grad]
        if len(params) != len(self._names):
            raise RuntimeError("the set of trainable parameters of Linearized.model changed after construction")
        return params

    def _tangent(self, x: torch.Tensor, e: Optional[_CacheEntry]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(J(w0, x)(w − w0), f(w0, x) when this call's path computed it, else None)."""
        how = self._linearization(e, x)
        params = self._params()
        if how == "dual":
            how = self._dual_pass(x, params)
        out, primal = _LinearizedFunction.apply(self, x, how, *params)
        if primal.numel() == 0 and out.numel() != 0:
            return out, None
        if e is not None and e.primal is None:
            e.primal = primal
        return out, primal

    def _dual_pass(self, x: torch.Tensor, params: List[torch.Tensor]):
        """One :class:`_DualPass` (with its graph when a backward can come), or, for a model with an
        op that has no forward-mode formula, a one-off :class:`_CachedLinearization` (reverse mode
        only) and the non-dual paths from then on."""
        initial = self._initial
        graph = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        with torch.set_grad_enabled(graph):  # δ = w − w0, in the graph: _DualPass takes its gradient edges
            deltas = [p - initial[name] for name, p in zip(self._names, params)]
        try:
            return _DualPass(self, x, deltas, graph=graph)
        except (RuntimeError, NotImplementedError, ModelForwardError) as e:
            cause = e.__cause__ if isinstance(e, ModelForwardError) and e.__cause__ is not None else e
            if not _not_implemented(cause):
                raise
            self._dual_ok = False
            return _CachedLinearization(self.model0, self._names, x) if graph else None

    def tangent(self, x: torch.Tensor) -> torch.Tensor:
        """J(w0, x)(w − w0), (n, k): the linearized model minus its value at w0."""
        check_input(x, "x", self.model0, allow_integer=True)
        e = self._entry(x, primal=False)
        if x.shape[0] == 0:
            primal = e.primal if e is not None and e.primal is not None else self._primal(x)
            return primal.new_zeros(primal.shape) + sum(p.sum() for p in self._params()) * 0
        return self._tangent(x, e)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h̄(w, x) = f(w0, x) + J(w0, x)(w − w0): (n, ...) → (n, k)."""
        check_input(x, "x", self.model0, allow_integer=True)
        e = self._entry(x, primal=False)
        if x.shape[0] == 0:  # no samples: (0, k), still connected to the parameters (zero gradients)
            primal = e.primal if e is not None and e.primal is not None else self._primal(x)
            return primal + sum(p.sum() for p in self._params()) * 0
        out, primal = self._tangent(x, e)
        if primal is None:
            primal = e.primal if e is not None and e.primal is not None else self._primal(x)
            if e is not None:
                e.primal = primal
        return primal + out

    def extra_repr(self) -> str:
        return f"trainable={len(self._names)} tensors, implementation={self.implementation!r}, " \
               f"cache_size={self.cache_size}"


# ----------------------------------------------------------------------------- lazy model
class LazyModel(nn.Module):
    r"""The α-scaled model of the paper: output α·h(w, x).

    With ``center=True`` (default), h(w, x) = f(w, x) − f(w0, x) where f(w0, ·) is a
    frozen deep copy of the initial model (parameters not trainable): h(w0) = 0 for any
    architecture, the authors' CNN trick. With ``center=False``, h = f and the model
    must already vanish at w0: this is accepted only for models built with the
    symmetrized init (``TwoLayer(..., symmetric=True)``, ``symmetric`` attribute True),
    whose output at init is zero up to round-off. When ``model`` is a
    :class:`Linearized`, centering uses its tangent part J(w0)(w − w0) directly (no copy,
    and no cancellation of α·f(w0) against itself).

    Train/eval mode (BatchNorm, Dropout): the centering term f(w0, x) is evaluated exactly
    as the live model is — each module in the live model's current mode, with the live
    model's current buffers (running statistics, copied so nothing of the frozen copy
    changes) and, in training mode, the same random stream as the live forward (identical
    dropout masks). So h(w0) = 0 holds exactly in both modes, and h(w) is the change due to
    the parameters w alone.

    Train on :func:`scaled_loss` (R(α h)/α²) or :meth:`loss`.

    Args:
        model: the network f; trained in place (``self.model`` is ``model``).
        alpha: α, finite and > 0, with α² and 1/α² representable in float64 and in the
            model's dtype (else ``ValueError``: the objective would be 0, inf or NaN).
        center: subtract the frozen initial model (see above); a bool.

    Shapes: input (n, ...) → output (n, k).
    """

    def __init__(self, model: nn.Module, alpha: float, *, center: bool = True):
        super().__init__()
        check_module(model)
        self.alpha = check_alpha(alpha, "alpha", model_param_info(model)[1])
        self.center = check_bool(center, "center")
        self.model = model
        self.model0: Optional[nn.Module] = None
        if center and not isinstance(model, Linearized):
            self.model0 = frozen_copy(model)
        if not center and not getattr(model, "symmetric", False):
            raise ValueError("center=False needs a model whose output at init is zero, i.e. built with the "
                             "symmetrized init (e.g. TwoLayer(..., symmetric=True)); use center=True "
                             "to subtract a frozen copy of the initial model instead")
        for attr in ("in_features", "out_features"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def train(self, mode: bool = True):
        """Sets training mode. The frozen initial copy is not trained: at every forward it
        runs in the mode of the live model (see :meth:`h`)."""
        super().train(mode)
        if self.model0 is not None:
            self.model0.eval()
        return self

    def _initial_output(self, x: torch.Tensor, rng) -> torch.Tensor:
        """f(w0, x) evaluated exactly as the live model was just evaluated: each module in the
        live model's mode, with the live model's current buffers (running statistics; copies
        in training mode, so nothing is updated) and, when ``rng`` is given, the random stream
        the live forward started from (identical dropout masks). Hence h(w0) = 0 exactly in
        both modes, for BatchNorm and Dropout too."""
        for m, m0 in zip(self.model.modules(), self.model0.modules()):
            m0.training = m.training
        try:
            buffers = {n: (b.clone() if rng is not None else b) for n, b in self.model.named_buffers()}
            with torch.no_grad():
                if rng is None:
                    return functional_call(self.model0, buffers, (x,), strict=False)
                after = _rng_states(x.device)
                _set_rng_states(rng, x.device)
                try:
                    return functional_call(self.model0, buffers, (x,), strict=False)
                finally:
                    _set_rng_states(after, x.device)
        finally:
            self.model0.eval()

    def h(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled centered model h(w, x) = f(w, x) − f(w0, x): (n, ...) → (n, k).

        f(w0, x) uses the initial parameters with the live model's current buffers and
        train/eval modes (and, in training mode, the same random stream), so that h(w0) = 0
        holds exactly for models with BatchNorm or Dropout too."""
        if self.center and isinstance(self.model, Linearized):
            return self.model.tangent(x)
        check_input(x, "x", self.model)
        if not self.center:
            return self.model(x)
        rng = _rng_states(x.device) if isinstance(x, torch.Tensor) and self.model.training else None
        out = self.model(x)
        return out - self._initial_output(x, rng)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """α·h(w, x): (n, ...) → (n, k)."""
        return self.alpha * self.h(x)

    def loss(self, x: torch.Tensor, target: torch.Tensor, loss: str = "square") -> torch.Tensor:
        """The scaled objective R(α h(w, x))/α² on a batch."""
        return scaled_loss(self(x), target, self.alpha, loss)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, center={self.center}"


# ----------------------------------------------------------------------------- CNN surrogate
_LINEAR_LAYERS = (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


class FrozenPatternNet(nn.Module):
    r"""The authors' "lazy net" **surrogate** for CNNs — not the exact linearization.

    For each input, the frozen initial network records its ReLU on/off masks and its
    max-pool argmax positions; the *current* weights are then applied with those masks
    fixed (a gated-linear network), and the output is centered like the authors':
    α·(FC(masked features(x)) − FC0(features0(x))). It shares the value and the Jacobian
    of the network at w0 but differs from :class:`Linearized` by O(‖w − w0‖²), so it
    tracks the linearized model only in the lazy regime.

    Supports VGG-style models: ``model.features`` an ``nn.Sequential`` of Conv2d, ReLU,
    MaxPool2d and linear layers (AvgPool2d, Flatten, Identity), and ``model.classifier``
    an ``nn.Linear`` (or a Sequential of such layers and ReLUs) applied to the flattened
    features.

    Args:
        model: the network with the *current* weights; used by reference (not copied), so
            the surrogate follows a model being trained (e.g. ``LazyModel.model``).
        initial: the frozen network at w0; None takes a frozen copy of ``model`` now.
        alpha: output scale α (finite, > 0).

    Shapes: input (n, C, H, W) → output (n, k).
    """

    def __init__(self, model: nn.Module, initial: Optional[nn.Module] = None, *, alpha: float = 1.0):
        super().__init__()
        check_module(model)
        for name in ("features", "classifier"):
            if not hasattr(model, name):
                raise TypeError(f"model must have a `{name}` attribute (VGG-style features + classifier)")
        self.alpha = check_alpha(alpha, "alpha", model_param_info(model)[1])
        self._check_layers(model)
        self.model = model
        self.initial = frozen_copy(model) if initial is None else initial
        if initial is not None:
            check_module(initial, "initial")
            self._check_layers(initial)
            if len(initial.features) != len(model.features):
                raise ValueError("initial must have the same architecture as model")

    def train(self, mode: bool = True):
        """Sets training mode; the frozen initial copy always stays in eval mode."""
        super().train(mode)
        if self.initial is not None:
            self.initial.eval()
        return self

    @staticmethod
    def _layers(seq):
        return list(seq) if isinstance(seq, nn.Sequential) else [seq]

    def _check_layers(self, model):
        if not isinstance(model.features, nn.Sequential):
            raise TypeError("model.features must be an nn.Sequential")
        for part in (model.features, model.classifier):
            for layer in self._layers(part):
                if not isinstance(layer, _LINEAR_LAYERS + (nn.ReLU, nn.MaxPool2d, nn.Dropout)):
                    raise TypeError(f"FrozenPatternNet does not support layer {type(layer).__name__}: only Conv2d, "
                                    "Linear, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, Identity")

    @staticmethod
    def _run_initial(layers, h, patterns):
        """Runs the frozen layers, recording ReLU masks and max-pool indices."""
        for layer in layers:
            if isinstance(layer, nn.ReLU):
                mask = h > 0
                patterns.append(mask)
                h = h * mask
            elif isinstance(layer, nn.MaxPool2d):
                h, idx = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                                      ceil_mode=layer.ceil_mode, return_indices=True)
                patterns.append(idx)
            elif isinstance(layer, nn.Dropout):
                continue
            else:
                h = layer(h)
        return h

    @staticmethod
    def _run_masked(layers, h, patterns, it):
        for layer in layers:
            if isinstance(layer, nn.ReLU):
                h = h * next(it)
            elif isinstance(layer, nn.MaxPool2d):
                idx = next(it)
                h = h.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
            elif isinstance(layer, nn.Dropout):
                continue
            else:
                h = layer(h)
        return h

    def patterns(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """ReLU masks and max-pool indices of the initial network on x, and its output."""
        pats: List[torch.Tensor] = []
        with torch.no_grad():
            h = self._run_initial(self._layers(self.initial.features), x, pats)
            out0 = self._run_initial(self._layers(self.initial.classifier), h.flatten(1), pats)
        return pats, out0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """α·(FC(current weights, initial masks)(x) − FC0(net0(x))): (n, C, H, W) → (n, k)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a tensor of shape (n, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        check_input(x, "x", self.model)
        pats, out0 = self.patterns(x)
        it = iter(pats)
        h = self._run_masked(self._layers(self.model.features), x, pats, it)
        out = self._run_masked(self._layers(self.model.classifier), h.flatten(1), pats, it)
        return self.alpha * (out - out0)

    @torch.no_grad()
    def stability(self, x: torch.Tensor) -> Dict[str, float]:
        """The authors' "stability of activations" of the current network on x.

        For each ReLU layer, the fraction of units (over n·C·H·W) whose on/off state equals
        the state in the initial network; for each max-pool, the fraction of pooled outputs
        whose argmax position is unchanged. Keys ``relu{i}`` / ``maxpool{i}`` in layer order.
        """
        pats0, _ = self.patterns(x)
        pats: List[torch.Tensor] = []
        h = self._run_initial(self._layers(self.model.features), x, pats)
        self._run_initial(self._layers(self.model.classifier), h.flatten(1), pats)
        out, n_relu, n_pool = {}, 0, 0
        for p0, p in zip(pats0, pats):
            agree = float((p0 == p).double().mean()) if p.numel() else 1.0
            if p.dtype == torch.bool:
                out[f"relu{n_relu}"] = agree
                n_relu += 1
            else:
                out[f"maxpool{n_pool}"] = agree
                n_pool += 1
        return out
