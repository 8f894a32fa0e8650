"""Diagnostics of laziness (paper §2 and the authors' CNN logs).

* :func:`relative_weight_change` — ‖w_t − w0‖ / ‖w0‖.
* :func:`activation_pattern_stability` — per ReLU layer, the fraction of units whose on/off
  state on given inputs equals the state at w0 (the paper's "stability of activations").
* :func:`kernel_distance` — ‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F.
* :func:`lazy_linearized_gap` — ‖α h(w_α) − α h̄(w̄_α)‖ on given inputs.
* :func:`rate_check` — runs lazy and linearized gradient descent for several α and fits
  the log-log slopes of Theorem 2.2.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lazyfast import ntk as _ntk
from lazyfast._validation import check_input, check_module, check_positive_finite
from lazyfast.data import teacher_student
from lazyfast.lazy import LazyModel, Linearized, square_loss
from lazyfast.models import TwoLayer

__all__ = ["relative_weight_change", "activation_pattern_stability", "relu_patterns", "kernel_distance",
           "lazy_linearized_gap", "rate_check", "parameter_distance"]


def _current_and_initial(model: nn.Module, model0: Optional[nn.Module]) -> Tuple[nn.Module, nn.Module]:
    """(current network, initial network) from a LazyModel/Linearized, or an explicit pair."""
    if model0 is not None:
        check_module(model0, "model0")
        return model, model0
    if isinstance(model, LazyModel):
        if isinstance(model.model, Linearized):
            return model.model.model, model.model.model0
        if model.model0 is None:
            raise ValueError("this LazyModel has no initial copy (center=False): pass model0 explicitly")
        return model.model, model.model0
    if isinstance(model, Linearized):
        return model.model, model.model0
    raise ValueError("model0 is required unless model is a LazyModel or Linearized (which keep w0)")


def _named_tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in module.named_parameters()}


def parameter_distance(model_a: nn.Module, model_b: nn.Module) -> float:
    """‖w_a − w_b‖ (Euclidean over all parameters matched by name)."""
    a, b = _named_tensors(model_a), _named_tensors(model_b)
    if set(a) != set(b):
        raise ValueError(f"models have different parameter names: {sorted(set(a) ^ set(b))[:5]}")
    sq = 0.0
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"parameter {k!r} has shapes {tuple(a[k].shape)} and {tuple(b[k].shape)}")
        sq += float((a[k].double() - b[k].double()).pow(2).sum())
    return math.sqrt(sq)


def relative_weight_change(model: nn.Module, model0: Optional[nn.Module] = None) -> float:
    """‖w_t − w0‖ / ‖w0‖ over all parameters.

    Args:
        model: the trained network, or a :class:`LazyModel` / :class:`Linearized` (which
            carry their initial copy; then ``model0`` may be omitted).
        model0: the network at initialization (same architecture).
    """
    check_module(model)
    cur, init = _current_and_initial(model, model0)
    norm0 = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in init.parameters()))
    if norm0 == 0:
        raise ValueError("the initial parameters are all zero: relative change undefined")
    return parameter_distance(cur, init) / norm0


# ----------------------------------------------------------------------------- activation patterns
_RELU_FUNCS = {torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class _ReluRecorder(TorchFunctionMode):
    """Records the on/off state (input > 0) of every relu call, functional or nn.ReLU.

    nn.ReLU calls F.relu, so one mode catches both; while the mode handles a call it is
    off, so F.relu → torch.relu is recorded once. Records are labelled by the innermost
    module being run (module forward hooks keep a name stack) and a per-module counter."""

    def __init__(self, stack: List[str]):
        super().__init__()
        self.stack = stack
        self.records: List[Tuple[str, torch.Tensor]] = []
        self.counts: Dict[str, int] = defaultdict(int)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_FUNCS:
            x = args[0] if args else kwargs.get("input")
            owner = self.stack[-1] if self.stack else ""
            i = self.counts[owner]
            self.counts[owner] += 1
            label = f"{owner}:relu{i}" if owner else f"relu{i}"
            self.records.append((label, (x > 0).detach()))
        return func(*args, **kwargs)


def _pop(stack: List[str]) -> None:
    stack.pop()  # a forward hook must return None (a value would replace the output)


@torch.no_grad()
def relu_patterns(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """On/off masks of every ReLU application in ``model(x)``, in call order.

    Catches ``nn.ReLU`` modules (labelled ``"<module path>"`` of the ReLU, e.g.
    ``"features.1"``) and functional relu calls inside a module's forward, as in
    ``TwoLayer`` and ``MLP`` (labelled ``"<module path>:relu<i>"``, or ``"relu<i>"`` in
    the root module).

    Returns:
        label → bool tensor shaped like the ReLU's input.
    """
    stack: List[str] = []
    handles = []
    for name, mod in model.named_modules():
        if name == "":
            continue
        handles.append(mod.register_forward_pre_hook(lambda m, inp, _n=name: stack.append(_n)))
        handles.append(mod.register_forward_hook(lambda m, inp, out: _pop(stack)))
    rec = _ReluRecorder(stack)
    try:
        with rec:
            model(x)
    finally:
        for h in handles:
            h.remove()
    out: Dict[str, torch.Tensor] = {}
    for label, mask in rec.records:
        if label.endswith(":relu0") and isinstance(model.get_submodule(label[:-6]), nn.ReLU):
            label = label[:-6]  # an nn.ReLU module: name it by its path
        while label in out:  # the same module applied twice
            label = label + "'"
        out[label] = mask
    return out


def activation_pattern_stability(model: nn.Module, x: torch.Tensor, model0: Optional[nn.Module] = None
                                 ) -> Dict[str, float]:
    """Per ReLU layer, the fraction of units whose on/off state on ``x`` equals the state
    at initialization (the paper's "stability of activations"), plus ``"all"`` over all units.

    Args:
        model: the trained network, or a :class:`LazyModel` / :class:`Linearized` (their
            current weights are run through the underlying network).
        x: (n, ...) inputs.
        model0: the network at w0 (optional for LazyModel / Linearized).

    Returns:
        dict layer label (see :func:`relu_patterns`) → fraction in [0, 1]; ``"all"``.
    """
    check_module(model)
    cur, init = _current_and_initial(model, model0)
    check_input(x, "x", cur)
    p = relu_patterns(cur, x)
    p0 = relu_patterns(init, x)
    if list(p) != list(p0):
        raise ValueError("model and model0 apply different ReLU layers: not the same architecture")
    if not p:
        raise ValueError("the model applies no ReLU: activation-pattern stability is undefined "
                         "(smooth activations have no on/off pattern)")
    out, same, total = {}, 0, 0
    for k in p:
        eq = p[k] == p0[k]
        out[k] = float(eq.double().mean()) if eq.numel() else 1.0
        same += int(eq.sum())
        total += eq.numel()
    out["all"] = same / total if total else 1.0
    return out


# ----------------------------------------------------------------------------- kernels and gaps
def kernel_distance(model: nn.Module, x: torch.Tensor, model0: Optional[nn.Module] = None, *, mode: str = "trace",
                    **ntk_kwargs) -> float:
    """‖Θ_t − Θ_0‖_F / ‖Θ_0‖_F on inputs ``x`` (eNTK by :func:`lazyfast.empirical_ntk`).

    ``model``/``model0`` as in :func:`relative_weight_change`; extra keyword arguments
    (``implementation``, ``chunk_size``) go to ``empirical_ntk``.
    """
    check_module(model)
    cur, init = _current_and_initial(model, model0)
    check_input(x, "x", cur)
    kt = _ntk.empirical_ntk(cur, x, mode=mode, **ntk_kwargs)
    k0 = _ntk.empirical_ntk(_with_grad(init), x, mode=mode, **ntk_kwargs)
    den = float(torch.linalg.vector_norm(k0))
    if den == 0:
        raise ValueError("Θ_0 is zero on x: relative kernel distance undefined")
    return float(torch.linalg.vector_norm(kt - k0)) / den


def _with_grad(module: nn.Module) -> nn.Module:
    """A copy whose parameters require grad when ``module`` is a frozen copy (the eNTK is
    taken with respect to requires_grad parameters)."""
    if all(p.requires_grad for p in module.parameters()):
        return module
    m = copy.deepcopy(module)
    for p in m.parameters():
        p.requires_grad_(True)
    return m


@torch.no_grad()
def lazy_linearized_gap(lazy: nn.Module, linearized: nn.Module, x: torch.Tensor) -> float:
    """‖α h(w_α) − α h̄(w̄_α)‖ on x, as the empirical L²(ρ) norm sqrt((1/n) Σ_i ‖·‖²).

    Args:
        lazy: the α-scaled model (e.g. ``LazyModel(net, α)``), output α h.
        linearized: the α-scaled linearized model (e.g. ``LazyModel(Linearized(net), α)``).
        x: (n, ...) inputs.
    """
    a, b = lazy(x), linearized(x)
    if a.shape != b.shape:
        raise ValueError(f"lazy and linearized outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).double().pow(2).sum().div(max(x.shape[0], 1)).sqrt())


# ----------------------------------------------------------------------------- Theorem 2.2
RATE_CHECK_INITS = ("centered", "symmetric", "uncentered")


def _fit_slope(alphas: Sequence[float], values: Sequence[float]) -> float:
    la = torch.tensor([math.log(a) for a in alphas], dtype=torch.float64)
    lv = torch.tensor([math.log(max(v, 1e-300)) for v in values], dtype=torch.float64)
    la_c = la - la.mean()
    return float((la_c * (lv - lv.mean())).sum() / (la_c * la_c).sum())


def rate_check(alphas: Sequence[float] = (10.0, 20.0, 50.0, 100.0, 200.0, 500.0), *, n: int = 20, d: int = 5,
               m: int = 40, k: int = 1, activation: str = "tanh", init: str = "centered", steps: int = 100,
               lr: float = 0.5, seed: int = 0, dtype: torch.dtype = torch.float64,
               num_threads: Optional[int] = 1) -> Dict[str, object]:
    r"""Measures the rates of Theorem 2.2 on a small two-layer problem.

    For each α, full-batch gradient descent (step ``lr`` on the scaled objective
    R(α h)/α², R = (1/2n)Σ(f − y)², horizon T = lr·steps) is run from the same w0 on the
    lazy model α h(w) and on the linearized model α h̄(w̄), with h(w0) = 0 obtained by
    ``init``:
    * ``"centered"`` (default): i.i.d. Gaussian init, h(w) = f(w) − f(w0)
      (``LazyModel(center=True)``) — the generic case of the theorem;
    * ``"symmetric"``: the paper's symmetrized init (``TwoLayer(symmetric=True)``,
      ``center=False``). Caution: for this init the first-order change of the tangent
      kernel cancels between each neuron and its mirror (their gradients are equal for
      the output weights and opposite for the input weights), so the output gap decays
      like α⁻², faster than the theorem's O(α⁻¹) bound; the other two rates are unchanged.
    * ``"uncentered"``: i.i.d. init and no centering, so h(w0) ≠ 0 — outside the theorem.
      The predictor starts at αf(w0), O(α) away from the targets, the weights move by O(1)
      and the rates visibly fail (weight-change slope near 0 instead of −1): a control.

    Along the paths it records the sup over steps of

    * ``weight_change``:  ‖w_α(t) − w0‖                    (theory: O(1/α)),
    * ``output_gap``:     ‖α h(w_α(t)) − α h̄(w̄_α(t))‖ on the training inputs, as
      sqrt((1/n)Σ_i‖·‖²)                                   (theory: O(1/α)),
    * ``param_gap``:      ‖w_α(t) − w̄_α(t)‖                (theory: O(1/α²)),

    and fits least-squares slopes of log(value) against log(α).

    The default activation is ``tanh``: the theorem assumes a locally Lipschitz Jacobian,
    which ReLU lacks; with ReLU a pre-activation that changes sign makes the gaps
    irregular until α is large enough that none does, so its slopes are noisy.

    Args:
        alphas: the α values (> 0, at least two distinct).
        n, d, m, k: data size, input dimension, width (even), outputs.
        activation: any ``TwoLayer`` activation.
        steps, lr: gradient-descent steps and step size.
        seed: seeds the data (teacher–student on the sphere) and the init.
        init: ``"centered"``, ``"symmetric"`` or ``"uncentered"`` (see above).
        dtype: float64 by default (the gaps fall to ~1/α² of O(1) quantities).
        num_threads: torch threads during the run (1 by default: the problem is tiny and
            more threads only add synchronization cost); None leaves the setting alone.

    Returns:
        dict with ``alphas``, ``slopes`` (``weight_change``, ``output_gap``, ``param_gap``),
        ``curves`` (the sup values per α, same keys), ``final_loss`` (lazy training loss at
        the end, per α) and the settings.
    """

    alphas = [check_positive_finite(a, f"alphas[{i}]") for i, a in enumerate(alphas)]
    if len(set(alphas)) < 2:
        raise ValueError("alphas must hold at least two distinct values to fit a slope")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    lr = check_positive_finite(lr, "lr")
    if init not in RATE_CHECK_INITS:
        raise ValueError(f"init must be one of {RATE_CHECK_INITS}, got {init!r}")
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _rate_check(alphas, n, d, m, k, activation, init, steps, lr, seed, dtype)
    finally:
        torch.set_num_threads(old_threads)


class _Uncentered(nn.Module):
    """α·f(w, x) with no centering (h(w0) ≠ 0): the control case of :func:`rate_check`."""

    def __init__(self, model: nn.Module, alpha: float):
        super().__init__()
        self.model, self.alpha = model, alpha

    def forward(self, x):
        return self.alpha * self.model(x)


def _rate_check(alphas, n, d, m, k, activation, init, steps, lr, seed, dtype):
    data = teacher_student(n, 1, d, seed=seed, dtype=dtype)
    x, y = data["x_train"], data["y_train"].expand(n, k).contiguous()
    torch.manual_seed(seed)
    symmetric = init == "symmetric"
    net0 = TwoLayer(d, m, k, activation=activation, symmetric=symmetric, dtype=dtype)

    curves: Dict[str, List[float]] = {"weight_change": [], "output_gap": [], "param_gap": []}
    final_loss: List[float] = []
    for alpha in alphas:
        if init == "uncentered":
            lazy = _Uncentered(copy.deepcopy(net0), alpha)
            lin = _Uncentered(Linearized(net0), alpha)  # α·(f(w0) + J(w0)(w − w0))
        else:
            lazy = LazyModel(copy.deepcopy(net0), alpha, center=not symmetric)
            lin = LazyModel(Linearized(net0), alpha, center=True)  # α·J(w0)(w − w0)
        w_lazy = list(lazy.model.parameters())
        w_lin = [p for p in lin.model.model.parameters()]
        w0 = [p.detach().clone() for p in net0.parameters()]
        opt_a = torch.optim.SGD(w_lazy, lr=lr)
        opt_b = torch.optim.SGD(w_lin, lr=lr)
        sup = dict.fromkeys(curves, 0.0)
        for _ in range(steps + 1):
            out_a, out_b = lazy(x), lin(x)
            with torch.no_grad():
                sup["weight_change"] = max(sup["weight_change"], _list_dist(w_lazy, w0))
                sup["param_gap"] = max(sup["param_gap"], _list_dist(w_lazy, w_lin))
                gap = float((out_a - out_b).pow(2).sum().div(n).sqrt())
                sup["output_gap"] = max(sup["output_gap"], gap)
            if _ == steps:
                final_loss.append(float(square_loss(out_a.detach(), y)))
                break
            opt_a.zero_grad()
            opt_b.zero_grad()
            (square_loss(out_a, y) / alpha ** 2).backward()
            (square_loss(out_b, y) / alpha ** 2).backward()
            opt_a.step()
            opt_b.step()
        for key in curves:
            curves[key].append(sup[key])
    slopes = {key: _fit_slope(alphas, vals) for key, vals in curves.items()}
    return {"alphas": alphas, "slopes": slopes, "curves": curves, "final_loss": final_loss,
            "settings": {"n": n, "d": d, "m": m, "k": k, "activation": activation, "init": init, "steps": steps,
                         "lr": lr, "seed": seed, "dtype": str(dtype)}}


def _list_dist(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float((p.detach() - q.detach()).pow(2).sum()) for p, q in zip(a, b)))
