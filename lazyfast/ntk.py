"""Public eNTK / JVP / VJP / NTK·v API with an ``implementation=`` switch (docs/engine.md).

``implementation``:
  * ``"structured"`` — the structured engine (:mod:`lazyfast._engine.structured`) for any module:
    per-layer exact rules (Linear of any rank, Conv1d/2d/3d, Embedding, norm affines, weight
    sharing) from one forward and one k-wide batched backward, the cheaper contraction order per
    layer, the compiled ``hadamard_gram_sum`` op for 2-D linear layers (all of ``lazyfast.MLP``);
    parameters no rule covers go to the generic path restricted to them. Chunked over samples
    within ``memory_budget``.
  * ``"generic"`` — the generic path (:mod:`lazyfast._engine.generic`) with its own choice, by its
    FLOP model, between:
  * ``"jacobian"`` — per-sample Jacobians (``vmap(jacrev)``), contracted; chunked over
    samples and parameter blocks.
  * ``"ntk_vp"`` — one VJP + one JVP per kernel column (never holds a Jacobian).
  * ``"fused"`` — the compiled two-layer kernels (:mod:`lazyfast._engine.two_layer`): only for an
    exact :class:`~lazyfast.models.TwoLayer` (no subclass, no hooks) with all parameters trainable.
  * ``"auto"`` — ``"fused"`` for an exact TwoLayer; else ``"structured"`` when rules cover every
    parameter or the FLOP model says the rules-plus-remainder split is cheaper than the generic
    path; else the generic path's own choice between ``"jacobian"`` and ``"ntk_vp"``.

Every kernel is a plain tensor (no autograd graph). The eNTK entry points accept integer inputs
(token ids) and refuse models whose samples are coupled or random (BatchNorm in training mode,
active dropout: call ``model.eval()``); no call changes a module's state.

``jvp`` / ``vjp`` / ``ntk_vp`` take ``"auto"``, ``"fused"`` or ``"generic"`` (torch.func on any module;
0.1 called it ``"reference"``, still accepted for one release with a FutureWarning). All the
``implementation=`` values of the API come from one vocabulary (:data:`lazyfast._validation.VOCABULARY`).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
from torch import nn

from lazyfast import reference, selfcheck
from lazyfast._engine import generic, structured, two_layer
from lazyfast._engine.generic import _transform_errors
from lazyfast._engine.outputs import ModelForwardError, output_dim, with_output
from lazyfast._engine.state import no_fastpath
from lazyfast._validation import (DEFAULT_MEMORY_BUDGET, IMPLEMENTATIONS_OF, check_chunk_size, check_finite,
                                  check_implementation, check_input, check_memory_budget, check_mode,
                                  check_module, model_param_info)
from lazyfast.models import MLP, TwoLayer

NTK_IMPLEMENTATIONS = IMPLEMENTATIONS_OF["empirical_ntk"]
PRODUCT_IMPLEMENTATIONS = IMPLEMENTATIONS_OF["products"]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _out_features(model: nn.Module, x: torch.Tensor) -> int:
    """k: declared by an exact lazyfast model, else from a state-preserving probe forward."""

    if type(model) in (MLP, TwoLayer) and "forward" not in model.__dict__:
        return int(model.out_features)

    return output_dim(model, x)


def auto_chunk_size(model: nn.Module, x: torch.Tensor, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Samples per Jacobian chunk so two chunks (x1 and x2) fit in ``memory_budget`` bytes."""
    _, dtype = model_param_info(model)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_sample = _out_features(model, x) * _n_params(model) * itemsize
    return max(1, int(memory_budget // (2 * max(per_sample, 1))))


def _use_fused(model, implementation) -> bool:
    """``"fused"`` (TwoLayer required) or ``"auto"`` on a TwoLayer selects lazyfast.two_layer."""
    if implementation == "fused":
        if not two_layer.fused_applicable(model):
            raise ValueError("implementation='fused' needs a lazyfast.models.TwoLayer with all parameters "
                             f"trainable, got {type(model).__name__}")
        return True
    return implementation == "auto" and two_layer.fused_applicable(model)


def _check_pair(model, x1, x2, allow_integer=False):
    check_module(model)
    check_input(x1, "x1", model, allow_integer=allow_integer)
    if x2 is not None:
        check_input(x2, "x2", model, like=x1, allow_integer=allow_integer)
        if x2.dtype != x1.dtype:
            raise TypeError(f"x2 has dtype {x2.dtype} but x1 has dtype {x1.dtype}")


def choose_implementation(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *,
                          mode: str = "trace", memory_budget: int = DEFAULT_MEMORY_BUDGET, info: Optional[dict] = None):
    """What ``implementation="auto"`` runs for these arguments: ``("fused", None)``,
    ``("structured", plan)`` or ``(generic choice, plan)`` by the FLOP model (docs/engine.md)."""

    if two_layer.fused_applicable(model):
        return "fused", None
    xs = x1 if x1.shape[0] or x2 is None else x2
    plan = structured.make_plan(model, xs)
    n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
    if info is not None:
        info["plan"] = plan
    if not plan.remainder:
        return "structured", plan
    if not plan.layers or n1 == 0 or n2 == 0:
        return "generic", plan
    probe = dict(k=plan.k, forward_flops=plan.forward_flops, act_numel=plan.act_numel)
    whole = generic.generic_costs(model, x1, x2, mode, memory_budget, vmap_weight_grads=True, **probe)
    rest = generic.generic_costs(model, x1, x2, mode, memory_budget, names=plan.remainder, vmap_weight_grads=True,
                                 **probe)
    mixed = structured.structured_cost(plan, n1, n2, mode) + min(rest["jacobian"], rest["ntk_vp"])
    if info is not None:
        info["costs"] = {"structured+remainder": mixed, "generic": min(whole["jacobian"], whole["ntk_vp"])}
    return ("structured" if mixed <= min(whole["jacobian"], whole["ntk_vp"]) else "generic"), plan


@contextlib.contextmanager
def _naming(name: str):
    """Re-raises a failure of the model's own forward naming the argument whose batch it was."""
    try:
        yield
    except ModelForwardError as e:
        raise ModelForwardError(e.detail, name=name) from e


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
                  implementation: str = "auto", chunk_size: Optional[int] = None,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, output_fn=None, check="auto") -> torch.Tensor:
    """Empirical neural tangent kernel Θ(x1, x2) of ``model`` at its current parameters.

    Args:
        model: any ``nn.Module`` mapping (n, ...) → (n, k); derivatives are taken with
            respect to its trainable parameters.
        x1: (n1, ...) inputs.
        x2: (n2, ...) inputs, or None for x1 (neural-tangents convention).
        mode: ``"trace"`` → (n1, n2) = (1/k)·Σ_a Θ_aa; ``"full"`` → (n1, n2, k, k).
        implementation: see the module docstring.
        chunk_size: samples (``"jacobian"``) or kernel columns (``"ntk_vp"``) per chunk;
            None lets ``"auto"`` size it from ``memory_budget``.
        memory_budget: bytes of Jacobians the generic path may hold at once.
        output_fn: what the kernel is of when the model does not return one (n, k) tensor: an
            attribute or key name (``"logits"`` for a Hugging Face ``ModelOutput``), an index into
            a tuple, or a callable ``out -> tensor``.
        check: the randomized self-check against autograd through the model
            (:mod:`lazyfast.selfcheck`): ``"auto"`` runs it when its estimated cost is at most 10 %
            of the call's, ``True`` always, ``False`` never. A failure raises
            :class:`~lazyfast.selfcheck.SelfCheckError`.

    Returns:
        The kernel in the model's dtype, on the model's device.
    """
    if check not in ("auto", True, False):
        raise ValueError(f"check must be 'auto', True or False, got {check!r}")
    check_module(model)
    model = with_output(model, output_fn)
    _check_pair(model, x1, x2, allow_integer=True)
    check_mode(mode)
    chunk_size = check_chunk_size(chunk_size)
    implementation = check_implementation(implementation, "empirical_ntk")
    memory_budget = check_memory_budget(memory_budget)
    # the kernel is not differentiable in the inputs: treat them as constants
    x1 = x1.detach()
    x2 = None if x2 is None else x2.detach()
    with _naming("x1" if x2 is None or x1.shape[0] else "x2"), _transform_errors(model, x1):
        K, k, used, flops = _kernel(model, x1, x2, mode, implementation, chunk_size, memory_budget)
    if check is True or (check == "auto" and selfcheck.check_cost_fraction(
            x1.shape[0], None if x2 is None else x2.shape[0], k, mode, forward_flops=flops,
            n_params=_n_params(model)) <= selfcheck.AUTO_MAX_FRACTION):
        selfcheck.self_check(model, x1, x2, K, mode=mode, k=k, implementation=used)
    return K


def _kernel(model, x1, x2, mode, implementation, chunk_size, memory_budget):
    """(kernel, k, implementation used, forward FLOPs per sample or None)."""
    if _use_fused(model, implementation):
        return two_layer.model_ntk(model, x1, x2, mode=mode).detach(), int(model.out_features), "fused", None

    structured.check_independent(model)
    plan = None
    if implementation == "auto":
        implementation, plan = choose_implementation(model, x1, x2, mode=mode, memory_budget=memory_budget)
    if implementation == "generic":
        implementation = "auto"  # the generic path's own choice between jacobian and ntk_vp
    if implementation == "structured":
        K = structured.structured_ntk(model, x1, x2, mode=mode, memory_budget=memory_budget, chunk_size=chunk_size,
                                      plan=plan)
        k = plan.k if plan is not None else (K.shape[-1] if mode == "full" else _out_features(model, x1))
        return K, k, "structured", None if plan is None else plan.forward_flops
    probe = {} if plan is None else dict(k=plan.k, forward_flops=plan.forward_flops, act_numel=plan.act_numel)
    if not probe:
        probe["k"] = _out_features(model, x1 if x1.shape[0] or x2 is None else x2)
    K = generic.generic_ntk(model, x1, x2, mode=mode, implementation=implementation, chunk_size=chunk_size,
                            memory_budget=memory_budget, **probe)
    return K, probe["k"], "jacobian" if implementation == "auto" else implementation, probe.get("forward_flops")


def jvp(model: nn.Module, x: torch.Tensor, tangents: Dict[str, torch.Tensor], *,
        implementation: str = "auto", output_fn=None) -> torch.Tensor:
    """Batched Jacobian-vector products J(w, x)·V for T tangents at once.

    Args:
        model: the network; x: (n, ...) inputs.
        tangents: parameter name (from ``model.named_parameters()``) → (T, *param.shape);
            missing trainable parameters count as zero.

    Returns:
        (T, n, k).
    """
    check_module(model)
    model = with_output(model, output_fn)
    check_input(x, "x", model, allow_integer=True)
    implementation = check_implementation(implementation, "products")
    if x.shape[0] == 0:  # k from the model, not guessed
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        T = reference.check_tangents(params, tangents)
        dt = next(iter(params.values())).dtype
        with _naming("x"):
            return torch.zeros((T, 0, _out_features(model, x)), dtype=dt, device=x.device)
    if _use_fused(model, implementation):
        return two_layer.model_jvp(model, x, tangents)
    with _naming("x"):  # the model's forward on x's per-sample shape: a clear error naming x, not torch's
        _out_features(model, x)

    with no_fastpath(), _naming('x'), _transform_errors(model, x):
        return reference.jvp(model, x, tangents)


def _check_cotangent(model, x, r, name):
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(r).__name__}")
    k = _out_features(model, x)
    if r.dim() != 2 or r.shape[0] != x.shape[0] or r.shape[1] != k:
        raise ValueError(f"{name} must have shape ({x.shape[0]}, {k}), got {tuple(r.shape)}")
    dt = x.dtype if x.is_floating_point() else model_param_info(model)[1]  # integer inputs: the model's dtype
    if r.dtype != dt or r.device != x.device:
        raise TypeError(f"{name} must have the inputs' dtype and device ({dt}, {x.device}), got ({r.dtype}, {r.device})")
    check_finite(**{name: r})


def vjp(model: nn.Module, x: torch.Tensor, cotangent: torch.Tensor, *, implementation: str = "auto",
        output_fn=None) -> Dict[str, torch.Tensor]:
    """Vector-Jacobian product J(w, x)ᵀ·R.

    Args:
        x: (n, ...) inputs; cotangent: R, (n, k).

    Returns:
        dict parameter name → gradient shaped like the parameter.
    """
    check_module(model)
    model = with_output(model, output_fn)
    check_input(x, "x", model, allow_integer=True)
    with _naming("x"):
        _check_cotangent(model, x, cotangent, "cotangent")
    implementation = check_implementation(implementation, "products")
    if x.shape[0] == 0:
        return {n: torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
                for n, p in model.named_parameters() if p.requires_grad}
    if _use_fused(model, implementation):
        return two_layer.model_vjp(model, x, cotangent)

    with no_fastpath(), _naming('x'), _transform_errors(model, x):
        return reference.vjp(model, x, cotangent)


def ntk_vp(model: nn.Module, x1: torch.Tensor, v: torch.Tensor, x2: Optional[torch.Tensor] = None, *,
           implementation: str = "auto", output_fn=None) -> torch.Tensor:
    """Kernel-vector product Θ(x1, x2)·v without forming Θ.

    ``out[i, a] = Σ_{j, b} Θ(x1_i, x2_j)_{ab} · v[j, b]``: one VJP over x2, one JVP over x1.

    Args:
        x1: (n1, ...); v: (n2, k); x2: (n2, ...) or None for x1.

    Returns:
        (n1, k).
    """
    check_module(model)
    model = with_output(model, output_fn)
    _check_pair(model, x1, x2, allow_integer=True)
    xb = x1 if x2 is None else x2
    with _naming("x1" if x2 is None else "x2"):
        _check_cotangent(model, xb, v, "v")
    implementation = check_implementation(implementation, "products")
    if x1.shape[0] == 0 or xb.shape[0] == 0:
        return torch.zeros((x1.shape[0], v.shape[1]), dtype=v.dtype, device=x1.device)
    if _use_fused(model, implementation):
        return two_layer.model_ntk_vp(model, x1, v, x2)

    with no_fastpath(), _naming('x1'), _transform_errors(model, x1):
        return reference.ntk_vp(model, x1, v, x2)
