"""The structured eNTK engine: exact per-layer kernels for any ``nn.Module`` (docs/engine.md).

One forward with hooks on the layers that have a rule records each call's input u and raw
output; ONE batched backward (``torch.autograd.grad(..., is_grads_batched=True)``, a loop over
the k outputs only where batching fails) gives every layer's output cotangents δ for all k
outputs at once. Each layer then adds its exact kernel

    Θ_l[(i,a),(j,b)] = Σ_{p,p'} ⟨δ_a(x_i)_p, δ_b(x_j)_p'⟩ · (γ⟨u(x_i)_p, u(x_j)_p'⟩ + 1_bias)

(p: positions; u: the input patch; γ: the squared weight multiplier), by the cheaper of two
exact contraction orders under a FLOP model: per-example gradient blocks ("gradients") or
position-pair Grams ("pairs"). Single-call 2-D linear layers go through the compiled
``hadamard_gram_sum`` op. Rules: ``nn.Linear`` (and lazyfast's ``_Dense``) on inputs of any rank,
``nn.Conv1d/2d/3d`` (stride, padding of every mode, dilation, groups), ``nn.Embedding``, the
affine parameters of ``LayerNorm``/``GroupNorm``/``BatchNorm*d`` (eval)/``InstanceNorm*d``, and the
projections of self-attention ``nn.MultiheadAttention`` (through an exact shadow forward used by
the engine's own forwards only); a layer called several times per forward concatenates its positions. Every other trainable parameter
(raw parameters, attention projections, custom modules, parameters tied across modules or used
outside their layer) is handed to the generic path restricted to those parameters
(:func:`lazyfast._engine.generic.generic_ntk` with ``names=``), and the kernels add up.

Samples must be independent (:func:`check_independent`), and no call here changes a module's
state (:class:`StateGuard`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lazyfast._engine.outputs import ModelForwardError, _batch_like, model_output, output_dim, run_forward  # noqa: F401
from lazyfast._engine.state import (StateGuard, _frozen, _plain_attrs, _simple, check_independent,  # noqa: F401
                                    no_fastpath, unmodified)
from lazyfast._engine.uses import ParamUses, alias_message
from lazyfast.models import _Dense
from lazyfast._engine.structured.rules import _RULES, _register_builtin, find_rule, rule_for

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
# a layer's contraction order: "gradients" (per-example gradient blocks J1 J2ᵀ) or "pairs"
# (position-pair Grams); "auto" lets the FLOP model choose (docs/engine.md, "Contraction orders")
CONTRACTIONS = ("auto", "gradients", "pairs")

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ============================================================================= rules
def _plain_forward(m: nn.Module, base) -> bool:
    from torch.nn.utils import parametrize

    return (type(m).forward is base.forward and "forward" not in m.__dict__
            and not parametrize.is_parametrized(m))


def _applies_to(base):
    def applies(m: nn.Module) -> bool:
        if not _plain_forward(m, base):
            return False
        if isinstance(m, nn.Embedding) and (m.scale_grad_by_freq or m.max_norm is not None):
            return False
        return True
    return applies


def _norm_applies(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
        return False
    for b in type(m).__mro__:  # the concrete torch class whose forward it must keep
        if b.__module__.startswith("torch.nn"):
            return _plain_forward(m, b)
    return False


def _register_builtin_rules() -> None:
    """The engine's rules, through the registry's door (lazyfast/rules.py), in matching order."""
    for base, kind in ((nn.Linear, "linear"), (_Dense, "linear"), (nn.Conv1d, "conv"), (nn.Conv2d, "conv"),
                       (nn.Conv3d, "conv"), (nn.Embedding, "embedding")):
        _register_builtin(base, kind, _applies_to(base), params=("weight",) if kind == "embedding" else
                          ("weight", "bias"))
    for base in _NORMS:
        _register_builtin(base, "norm", _norm_applies)


def rule_kind(m: nn.Module) -> Optional[str]:
    """'linear' | 'conv' | 'embedding' | 'norm' | 'custom' for a module with a rule, else None."""
    from torch.nn.utils import parametrize

    rule = find_rule(m)
    if rule is None:
        return None
    if rule.kind == "custom" and parametrize.is_parametrized(m):
        return None
    return rule.kind


@dataclass
class _Layer:
    module: nn.Module
    kind: str
    w_on: bool
    b_on: bool
    names: List[str]
    calls: int = 0
    bdims: List[int] = field(default_factory=list)  # batch dim of each call's input/output
    clone_out: List[bool] = field(default_factory=list)
    clone_in: List[bool] = field(default_factory=list)
    in_shapes: List[tuple] = field(default_factory=list)  # per sample (batch dim removed)
    out_shapes: List[tuple] = field(default_factory=list)
    contraction: str = "gradients"  # "gradients" | "pairs" ("auto" for an embedding: per chunk pair)
    gamma: float = 1.0
    site: Optional[tuple] = None  # an operator rule's (kind, id(weight), id(bias)); None: a module rule
    folds: List[int] = field(default_factory=list)  # per call: rows per sample when the batch is folded


@dataclass
class Plan:
    """What the probe forwards found: rule layers, the remainder's parameter names, k, and
    per-sample costs (forward FLOPs, activation numbers)."""
    layers: List[_Layer]
    remainder: List[str]
    k: int
    forward_flops: float
    act_numel: int
    n_params: int
    shadows: list = field(default_factory=list)  # (MultiheadAttention, its _InProj) pairs
    revisions: list = field(default_factory=list)  # what real calls changed (PlanMismatch reasons)
    reasons: dict = field(default_factory=dict)  # remainder parameter name -> why no rule takes it


class _Brackets:
    """Context manager: each rule layer's own forward runs inside a bracket (an instance-level
    ``forward`` that the module's ``__call__`` calls after every forward pre-hook and before every
    forward hook, global ones included). The bracket pushes the layer on ``stack`` while its
    class forward runs, so a parameter use is inside the layer exactly when the layer's own
    forward makes it (a hook that reads the weight is outside), and hands (module, call index,
    input, raw output) to ``record``, which may return a replacement output (a clone)."""

    def __init__(self, modules, stack: list, record):
        self.modules, self.stack, self.record = list(modules), stack, record

    def __enter__(self):
        for m in self.modules:
            m.__dict__["forward"] = self._bracket(m)
        return self

    def _bracket(self, m):
        cls_forward = type(m).forward
        stack, record = self.stack, self.record

        def forward(*args, **kwargs):
            stack.append(m)
            try:
                out = cls_forward(m, *args, **kwargs)
            finally:
                stack.pop()
            rep = record(m, _first_input(args, kwargs), out)
            return out if rep is None else rep

        return forward

    def __exit__(self, *exc):
        for m in self.modules:
            m.__dict__.pop("forward", None)
        return False


class PlanMismatch(Exception):
    """The real call disagreed with the plan (internal: the engine revises the plan and reruns)."""

    def __init__(self, reason: str, drop=(), foreign=(), clone_in=(), clone_out=(), reprobe: bool = False):
        super().__init__(reason)
        self.reason, self.drop, self.foreign = reason, set(drop), set(foreign)
        self.clone_in, self.clone_out, self.reprobe = set(clone_in), set(clone_out), reprobe


def _first_input(args, kwargs):
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


class _InProj(nn.Module):
    """The packed input projection of a self-attention ``nn.MultiheadAttention`` as a linear layer
    (z = x W_inᵀ + b_in, then split into q, k, v), so the Linear rule covers ``in_proj_weight`` /
    ``in_proj_bias``. It exists only inside the engine's probe and capture forwards."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        object.__setattr__(self, "mha", mha)  # not a submodule: no parameters of its own

    @property
    def weight(self):
        return self.mha.in_proj_weight

    @property
    def bias(self):
        return self.mha.in_proj_bias

    def forward(self, x):
        return F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias)


def _attention_rule_applies(m) -> bool:
    return (type(m) is nn.MultiheadAttention and "forward" not in m.__dict__ and m._qkv_same_embed_dim
            and m.in_proj_weight is not None and m.bias_k is None and m.bias_v is None and not m.add_zero_attn)


def _shadow_attention(mha, proj, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                      average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention.forward`` for self-attention with the projections run by modules
    the hooks see: ``proj`` (the packed in-projection) and ``mha.out_proj``; the attention core is
    ``F.multi_head_attention_forward`` with identity projections, which are exact (x·1 + 0)."""
    if not (query is key and key is value) or query.dim() != 3:
        return nn.MultiheadAttention.forward(mha, query, key, value, key_padding_mask=key_padding_mask,
                                             need_weights=need_weights, attn_mask=attn_mask,
                                             average_attn_weights=average_attn_weights, is_causal=is_causal)
    x = query.transpose(1, 0) if mha.batch_first else query
    E = mha.embed_dim
    q, k, v = proj(x).chunk(3, dim=-1)
    eye = torch.eye(E, dtype=x.dtype, device=x.device)
    out, w = F.multi_head_attention_forward(
        q, k, v, E, mha.num_heads, None, x.new_zeros(3 * E), None, None, False, mha.dropout, eye, x.new_zeros(E),
        training=mha.training, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
        use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
        average_attn_weights=average_attn_weights, is_causal=is_causal)
    out = mha.out_proj(out)
    return (out.transpose(1, 0) if mha.batch_first else out), w


class _Shadows:
    """Context manager installing the attention shadows for the engine's own forwards only."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __enter__(self):
        import functools

        for mha, proj in self.pairs:
            mha.forward = functools.partial(_shadow_attention, mha, proj)
        return self

    def __exit__(self, *exc):
        for mha, _ in self.pairs:
            mha.__dict__.pop("forward", None)
        return False


def _wb(m):
    if isinstance(m, _InProj):
        return m.weight, m.bias
    if isinstance(m, _LinearT):
        return m.params
    rule = rule_for(m) if _RULES else None
    if rule is not None:
        ps = [m._parameters.get(n) for n in rule.params]
        return tuple(ps + [None] * (2 - len(ps)))
    return m._parameters.get("weight"), m._parameters.get("bias")


# ----------------------------------------------------------------------------- operator-rule shells
class _LinearT(nn.Module):
    """``addmm(b, x, W)`` with W (in, out) (Hugging Face's Conv1D) seen as a linear layer: ``weight``
    is Wᵀ (out, in), a view, for the shape-based cost model; ``params`` the real parameters."""

    def __init__(self, W, b):
        super().__init__()
        object.__setattr__(self, "params", (W, b))

    @property
    def weight(self):
        return self.params[0].T

    @property
    def bias(self):
        return self.params[1]


class _ScaleShift(nn.Module):
    """x·γ (``weight``) or x + β (``bias``), γ / β broadcast into x."""

    def __init__(self, w, b):
        super().__init__()
        self._parameters["weight"] = w
        self._parameters["bias"] = b


def _op_shell(kind: str, w, b, meta: dict) -> nn.Module:
    """A module-shaped holder of an operator rule's parameters and arguments, so the module rules'
    factor code serves it (it shares the parameters; it is never called)."""
    if kind == "linear_t":
        return _LinearT(w, b)
    if kind in ("scale", "shift"):
        return _ScaleShift(w, b)
    cls = {"layer_norm": nn.LayerNorm, "group_norm": nn.GroupNorm, "batch_norm": nn.BatchNorm2d}[kind]
    sh = cls.__new__(cls)
    nn.Module.__init__(sh)
    sh._parameters["weight"] = w
    sh._parameters["bias"] = b
    sh.eps = meta["eps"]
    if kind == "layer_norm":
        sh.normalized_shape = tuple(meta["normalized_shape"])
        sh.elementwise_affine = True
    elif kind == "group_norm":
        sh.num_groups = meta["num_groups"]
        sh.affine = True
    else:
        sh._buffers["running_mean"] = meta["running_mean"]
        sh._buffers["running_var"] = meta["running_var"]
        sh.momentum, sh.track_running_stats, sh.affine = 0.0, True, True
    sh.training = False
    return sh


_OP_KIND = {"layer_norm": "norm", "group_norm": "norm", "batch_norm": "norm", "linear_t": "linear",
            "scale": "scale", "shift": "shift"}


def plan_fingerprint(model: nn.Module, x: torch.Tensor) -> tuple:
    """Everything a :class:`Plan` depends on: the per-sample input shape, dtype and device; every
    module's identity, class, training flag, instance-level ``forward``, hooks and plain attributes
    (numbers, strings, dtypes and short lists / tuples / dicts of them: stride, padding, eps,
    batch_first, weight_multiplier, ...); every parameter's identity, shape,
    dtype, device and ``requires_grad``; buffer shapes; the global module hooks. Parameter *values*
    are not part of it (a plan does not depend on them)."""
    from torch.nn.modules import module as _mod

    mods = []
    for name, m in model.named_modules():
        d = m.__dict__
        attrs = tuple((a, _frozen(v)) for a, v in d.items() if not a.startswith("_") and a != "training"
                      and _simple(v))
        fwd = d.get("forward")
        mods.append((name, id(m), type(m), m.training, None if fwd is None else id(fwd), attrs,
                     tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks),
                     tuple(getattr(m, "_backward_pre_hooks", ())),
                     tuple((k, id(p), tuple(p.shape), p.dtype, p.device, p.requires_grad)
                           for k, p in m._parameters.items() if p is not None),
                     tuple((k, tuple(b.shape), b.dtype) for k, b in m._buffers.items() if b is not None)))
    glob = (tuple(_mod._global_forward_hooks), tuple(_mod._global_forward_pre_hooks),
            tuple(_mod._global_backward_hooks), tuple(getattr(_mod, "_global_backward_pre_hooks", ())))
    return (tuple(x.shape[1:]), x.dtype, x.device, tuple(mods), glob)


# model -> (fingerprint, plan); a weak key, so a model's plan goes with the model
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _copy_plan(plan: Plan) -> Plan:
    """A plan whose layers can take their own contraction orders (``choose_contractions`` writes them)."""
    return dataclasses.replace(plan, layers=[copy.copy(L) for L in plan.layers])


def make_plan(model: nn.Module, x: torch.Tensor, cache: bool = True) -> Plan:
    """The model's :class:`Plan` for inputs shaped like ``x``: probed (:func:`probe_plan`) on the
    first call, then reused while :func:`plan_fingerprint` is unchanged (a changed hook, flag,
    attribute, parameter or input shape probes again). Each call returns its own copy."""
    if not cache:
        return probe_plan(model, x)
    fp = plan_fingerprint(model, x)
    try:
        hit = _PLANS.get(model)
    except TypeError:  # not weak-referenceable / hashable: no cache
        return probe_plan(model, x)
    if hit is not None and hit[0] == fp:
        return _copy_plan(hit[1])
    plan = probe_plan(model, x)
    # a plan that references the model itself would keep it alive through the weak dictionary
    if all(L.module is not model for L in plan.layers) and all(m is not model for m, _ in plan.shadows):
        try:
            _PLANS[model] = (fp, plan)
        except TypeError:
            pass
        return _copy_plan(plan)
    return plan


def remember_plan(model: nn.Module, x: torch.Tensor, plan: Plan) -> None:
    """Replaces the cached plan of ``model`` (inputs shaped like ``x``) by a revised one."""
    if any(L.module is model for L in plan.layers) or any(m is model for m, _ in plan.shadows):
        return
    try:
        _PLANS[model] = (plan_fingerprint(model, x), _copy_plan(plan))
    except TypeError:
        pass


def probe_plan(model: nn.Module, x: torch.Tensor) -> Plan:
    """Probes the model (forwards on 1 and 2 copies of one sample, grad enabled, state unchanged)."""
    from torch.utils.flop_counter import FlopCounterMode

    named = dict(model.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    owners: Dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    name_of = {id(p): n for n, p in trainable.items()}
    cands = []
    shadows = [(m, _InProj(m)) for m in model.modules() if _attention_rule_applies(m)]
    reasons: Dict[str, str] = {}

    def why(p, text):
        if p is not None and id(p) in name_of:
            reasons.setdefault(name_of[id(p)], text)

    for m in list(model.modules()) + [proj for _, proj in shadows]:
        kind = "linear" if isinstance(m, _InProj) else rule_kind(m)
        if kind is None:
            for p in m._parameters.values():
                why(p, f"no rule for {type(m).__name__} (its class or forward is not one a rule covers)")
            continue
        w, b = _wb(m)
        slots = rule_for(m).params if kind == "custom" else ("weight", "bias")
        others = [p for key, p in m._parameters.items() if key not in slots and p is not None
                  and p.requires_grad]
        if others:
            for p in m._parameters.values():
                why(p, f"{type(m).__name__} holds parameters besides weight and bias")
            continue
        w_on = w is not None and w.requires_grad and owners[id(w)] == 1
        b_on = b is not None and b.requires_grad and owners[id(b)] == 1
        for p, on in ((w, w_on), (b, b_on)):
            if not on:
                why(p, "shared by several modules (tied)")
        if w_on or b_on:
            cands.append(_Layer(m, kind, w_on, b_on, []))
    owner = {}
    for L in cands:
        for p, on in zip(_wb(L.module), (L.w_on, L.b_on)):
            if on:
                owner[id(p)] = L.module
    records: Dict[int, list] = {id(L.module): [] for L in cands}
    stack: list = []
    leaf_numel = [0]
    # parameters no module rule takes may be taken by an operator rule (lazyfast/_uses.py, match_op)
    site_params = {id(p) for p in trainable.values() if id(p) not in owner and owners.get(id(p), 0) <= 1}
    site_recs: Dict[tuple, list] = {}
    site_meta: Dict[tuple, dict] = {}
    site_foreign, bad_keys = set(), set()

    def record_site(key, inp, out, meta):
        site_meta.setdefault(key, meta)
        site_recs.setdefault(key, []).append(
            (inp, inp._version, tuple(inp.shape), out, out._version, tuple(out.shape))
            if isinstance(out, torch.Tensor) else None)

    def record(m, inp, out):
        if isinstance(inp, torch.Tensor) and isinstance(out, torch.Tensor):
            records[id(m)].append((inp, inp._version, tuple(inp.shape), out, out._version, tuple(out.shape)))
        else:
            records[id(m)].append(None)

    def count(m, args, out):
        if isinstance(out, torch.Tensor):
            leaf_numel[0] += out.numel()

    shapes = {}
    site_order: list = []
    foreign, nograd = set(), set()
    k = 1
    flops = 0.0
    with StateGuard(model), torch.enable_grad():
        for nb in (1, 2):
            for r in records.values():
                r.clear()
            site_recs.clear()
            handles = []
            try:
                if nb == 2:
                    handles += [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
                xb = _batch_like(x, nb)
                uses = ParamUses(model, owner, stack, site_params=site_params, record_site=record_site)
                with _Shadows(shadows), _Brackets([L.module for L in cands], stack, record), uses:
                    out = model_output(run_forward(model, xb, shown=x), nb)
                k = max(1, out.numel() // nb)
            finally:
                for h in handles:
                    h.remove()
            if uses.aliased:
                raise ValueError(alias_message(sorted(uses.aliased)[0]))
            site_foreign |= uses.site_foreign
            bad_keys |= uses.bad_keys
            if nb == 1:
                site_order = list(site_recs)
            elif list(site_recs) != site_order:
                bad_keys |= set(site_recs) ^ set(site_order)
            shapes[nb] = {key: [None if t is None else (t[1] != t[0]._version, t[2], t[4] != t[3]._version, t[5])
                                for t in r] for key, r in list(records.items()) + list(site_recs.items())}
            foreign |= uses.foreign
            nograd |= {key for key, r in records.items() if any(t is not None and not t[3].requires_grad for t in r)}
            del out
    by_id = {id(p): p for p in trainable.values()}
    for key in site_order:
        kind, wid, bid = key
        ids = [i for i in (wid, bid) if i is not None]
        if key in bad_keys or any(i in site_foreign for i in ids) or key not in shapes[2]:
            for i in ids:
                reasons[name_of[i]] = f"an operator rule ({kind}) would take it, but it is used elsewhere too"
            continue
        shell = _op_shell(kind, by_id.get(wid), by_id.get(bid), site_meta[key])
        L = _Layer(shell, _OP_KIND[kind], wid is not None, bid is not None, [], site=key)
        for nb in (1, 2):
            shapes[nb][id(shell)] = shapes[nb].pop(key)
        cands.append(L)
    layers, covered = [], set()
    for L in cands:
        if id(L.module) in nograd:
            raise ValueError(no_grad_message(model, L.module))
        one, two = shapes[1][id(L.module)], shapes[2][id(L.module)]
        ok = len(one) == len(two) and len(one) > 0 and None not in one and None not in two
        if ok:
            for (_, s1, _, o1), (ci, s2, co, o2) in zip(one, two):
                bd = _batch_dim(s1, s2, o1, o2, L)
                fold = 1
                if bd is None and L.site is not None and L.kind == "linear" and len(s1) == 2 and len(o1) == 2 \
                        and s2[0] == 2 * s1[0] and o2[0] == 2 * o1[0] == 2 * s1[0] and s1[1:] == s2[1:]:
                    # the batch folded into the rows, (n·F, in) (x.view(-1, d) before an addmm)
                    bd, fold = 0, s1[0]
                    s1, o1 = (1,) + s1, (1,) + o1
                if bd is None:
                    ok = False
                    break
                L.folds.append(fold)
                L.bdims.append(bd)
                L.clone_in.append(ci)
                L.clone_out.append(co)
                L.in_shapes.append(s1[:bd] + s1[bd + 1:])
                L.out_shapes.append(o1[:bd] + o1[bd + 1:])
        if not ok:
            for p in _wb(L.module):
                why(p, f"its {type(L.module).__name__} did not run in the probe, or its batch axis could not be "
                       "found (calls of different shapes or counts)")
            continue
        m = L.module
        if L.w_on and name_of[id(_wb(m)[0])] in foreign:
            L.w_on = False
            why(_wb(m)[0], "used outside its layer's own forward")
        if L.b_on and name_of[id(_wb(m)[1])] in foreign:
            L.b_on = False
            why(_wb(m)[1], "used outside its layer's own forward")
        if not (L.w_on or L.b_on):
            continue
        L.calls = len(one)
        L.gamma = float(getattr(m, "weight_multiplier", 1.0)) ** 2
        for p, on in zip(_wb(m), (L.w_on, L.b_on)):
            if on:
                L.names.append(name_of[id(p)])
                covered.add(name_of[id(p)])
        layers.append(L)
    remainder = [n for n in trainable if n not in covered]
    if remainder:  # the FLOP model compares against the generic path: count the whole forward
        with StateGuard(model), torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(_batch_like(x, 1))
        flops = float(fc.get_total_flops())
    else:  # only the rule layers' products matter (and counting is not free)
        flops = sum(_layer_flops(L) for L in layers)
    return Plan(layers, remainder, k, float(max(flops, 2 * sum(p.numel() for p in named.values()))),
                max(leaf_numel[0] // 2, int(x[:1].numel())), sum(p.numel() for p in trainable.values()), shadows,
                reasons={n: reasons.get(n, "no rule covers it (a raw parameter)") for n in remainder})


def module_name(model: nn.Module, m: nn.Module) -> str:
    for name, sub in model.named_modules():
        if sub is m:
            return name or "<model>"
    if isinstance(m, _InProj):
        return module_name(model, m.mha) + ".in_proj"
    return type(m).__name__


def no_grad_message(model, m) -> str:
    return (f"{type(m).__name__} {module_name(model, m)!r} ran with gradients off (its output does not require "
            "grad although its parameters do): the layer runs under torch.no_grad() / torch.inference_mode(), or "
            "inside torch.utils.checkpoint(..., use_reentrant=True), whose recomputation autograd.grad cannot use. "
            "Use use_reentrant=False, remove the no_grad, or make the parameters constants with "
            "requires_grad_(False) if no gradient is meant to reach them")


def _layer_flops(L: _Layer) -> float:
    """Forward FLOPs of a rule layer on one sample (all its calls)."""
    if L.kind == "custom":
        rule = rule_for(L.module)
        if rule is not None and rule.flops is not None:
            return float(rule.flops(L.module, 1, 1))
        P = sum(p.numel() for p in _wb(L.module) if p is not None)
        return 2.0 * P * sum(max(1, math.prod(s[:-1])) for s in L.out_shapes)
    w = L.module.weight
    if L.kind == "linear":
        return 2.0 * w.numel() * sum(math.prod(s[:-1]) for s in L.out_shapes)
    if L.kind == "conv":
        return 2.0 * w.numel() * sum(math.prod(s[1:]) for s in L.out_shapes)
    return 4.0 * sum(math.prod(s) for s in L.out_shapes)


def _batch_dim(s1, s2, o1, o2, L) -> Optional[int]:
    """The dim that holds the batch in a call's input and output (same index), or None."""
    if len(s1) != len(s2) or len(o1) != len(o2) or len(s1) < 1:
        return None
    din = [d for d in range(len(s1)) if s2[d] != s1[d]]
    dout = [d for d in range(len(o1)) if o2[d] != o1[d]]
    if len(din) != 1 or din != dout or s1[din[0]] != 1 or s2[din[0]] != 2 or o1[dout[0]] != 1:
        return None
    d = din[0]
    if L.kind in ("scale", "shift", "custom") and d != 0:
        return None
    if L.kind in ("conv", "norm") and not isinstance(L.module, nn.LayerNorm) and d != 0:
        return None
    if L.kind == "linear" and d == len(s1) - 1:
        return None
    if isinstance(L.module, nn.LayerNorm) and d >= len(s1) - len(L.module.normalized_shape):
        return None
    if L.kind == "conv" and len(s1) != L.module.weight.dim():  # batched input only
        return None
    return d


# ============================================================================= capture
# The per-call verification of the plan (on in production; off only to measure what it prevents).
_VERIFY = True


def _capture(model: nn.Module, plan: Plan, x: torch.Tensor, batched: bool = True, verify: Optional[bool] = None):
    """One forward and one batched backward: per layer, per call, (u, δ) with u the input
    (batch first, detached) and δ (k, n, *out) the output cotangents of all k outputs.

    The forward on the real batch confirms the plan (``verify``; docs/engine.md, "Exact on every
    call"): each rule layer ran as many times as planned, each call's input and output hold the
    batch at the planned axis with the planned per-sample shapes, no captured tensor was changed
    in place afterwards unless it was cloned, no covered parameter was used outside its layer's
    own forward, no parameter was reached through an alias, and the output is (n, k). A
    disagreement raises :class:`PlanMismatch` (the engine revises the plan and reruns) before
    any cotangent is computed; an alias raises ValueError."""
    layers = plan.layers
    n = x.shape[0]
    recs: Dict[int, list] = {id(L.module): [] for L in layers}
    by_id = {id(L.module): L for L in layers}

    def record(m, inp, out):
        L = by_id[id(m)]
        c = len(recs[id(m)])
        if not (isinstance(inp, torch.Tensor) and isinstance(out, torch.Tensor)):
            recs[id(m)].append(None)
            return None
        u = inp.detach()
        if c < len(L.clone_in) and L.clone_in[c]:
            u = u.clone()
        recs[id(m)].append([u, out, inp, inp._version, out._version])
        if c < len(L.clone_out) and L.clone_out[c]:
            return out.clone()
        return None

    stack: list = []
    uses = None
    verify = _VERIFY if verify is None else verify
    sites = {L.site: L.module for L in layers if L.site is not None}
    if verify or sites:
        owner = {}
        for L in layers:
            for p, on in zip(_wb(L.module), (L.w_on, L.b_on)):
                if on:
                    owner[id(p)] = L.module
        planned = {i: key for key in sites for i in key[1:] if i is not None}
        uses = ParamUses(model, owner if verify else {}, stack, sites=planned,
                         record_site=lambda key, inp, out, meta: record(sites[key], inp, out))
    modules = [L.module for L in layers if L.site is None]
    with torch.enable_grad(), _Shadows(plan.shadows), _Brackets(modules, stack, record):
        if uses is not None:
            with uses:
                raw = run_forward(model, x)
        else:
            raw = run_forward(model, x)
    out = model_output(raw, n)
    if verify:
        _verify_capture(model, plan, n, recs, uses, out)
    elif uses is not None and uses.aliased:
        raise ValueError(alias_message(sorted(uses.aliased)[0]))
    out = out.reshape(n, plan.k)
    n, k = x.shape[0], plan.k
    targets, index = [], []
    for L in layers:
        rs = recs[id(L.module)]
        if len(rs) != L.calls or None in rs:  # only without verification
            raise PlanMismatch(f"{type(L.module).__name__} ran {len(rs)} times, planned {L.calls}", drop={id(L.module)})
        for r in rs:
            index.append((L, r))
            targets.append(r[1])
    grads = [None] * len(targets)
    for (L, r) in index:
        if not r[1].requires_grad:
            raise ValueError(no_grad_message(model, L.module))
    if targets:
        eye = torch.eye(k, dtype=out.dtype, device=out.device).unsqueeze(1).expand(k, n, k)
        if batched and k > 1:
            try:
                grads = list(torch.autograd.grad(out, targets, grad_outputs=eye, is_grads_batched=True,
                                                 allow_unused=True, retain_graph=True))
            except RuntimeError:
                batched = False
        if not batched or k == 1:
            cols = [torch.autograd.grad(out, targets, grad_outputs=eye[a], allow_unused=True,
                                        retain_graph=a < k - 1) for a in range(k)]
            grads = [None if any(c[t] is None for c in cols) else
                     (cols[0][t].unsqueeze(0) if k == 1 else torch.stack([c[t] for c in cols]))
                     for t in range(len(targets))]
    del out
    caps: Dict[int, list] = {id(L.module): [] for L in layers}
    for (L, r), g in zip(index, grads):
        o = r[1]
        g = torch.zeros((k,) + tuple(o.shape), dtype=o.dtype, device=o.device) if g is None else g.detach()
        c = len(caps[id(L.module)])
        bd = L.bdims[c]
        fold = L.folds[c] if c < len(L.folds) else 1
        if fold > 1:  # (n·F, ...) rows → (n, F, ...)
            u = r[0].reshape((n, fold) + tuple(r[0].shape[1:]))
            g = g.reshape((k, n, fold) + tuple(g.shape[2:]))
            caps[id(L.module)].append((u, g))
            r.clear()
            continue
        u = r[0] if bd == 0 else r[0].movedim(bd, 0)
        caps[id(L.module)].append((u, g if bd == 0 else g.movedim(bd + 1, 1)))
        r.clear()
    return caps


def _verify_capture(model, plan: Plan, n: int, recs, uses, out) -> None:
    """Raises PlanMismatch (or ValueError for an alias) where the real call disagrees with the plan."""
    if uses.aliased:
        raise ValueError(alias_message(sorted(uses.aliased)[0]))
    if out.numel() != n * plan.k:
        raise PlanMismatch(f"the output has {out.numel() // max(n, 1)} numbers per sample, planned {plan.k}",
                           reprobe=True)
    drop, clone_in, clone_out = set(), set(), set()
    for L in plan.layers:
        rs = recs[id(L.module)]
        if len(rs) != L.calls or None in rs:
            drop.add(id(L.module))
            continue
        for c, r in enumerate(rs):
            u, o, inp, iv, ov = r
            bd = L.bdims[c]
            fold = L.folds[c] if c < len(L.folds) else 1
            if fold > 1:
                bad = (tuple(inp.shape) != (n * fold,) + tuple(L.in_shapes[c][1:])
                       or tuple(o.shape) != (n * fold,) + tuple(L.out_shapes[c][1:]))
            else:
                bad = (inp.dim() != len(L.in_shapes[c]) + 1 or o.dim() != len(L.out_shapes[c]) + 1
                       or inp.shape[bd] != n or o.shape[bd] != n
                       or tuple(inp.shape[:bd] + inp.shape[bd + 1:]) != L.in_shapes[c]
                       or tuple(o.shape[:bd] + o.shape[bd + 1:]) != L.out_shapes[c])
            if bad:
                drop.add(id(L.module))
                break
            if inp._version != iv and not L.clone_in[c]:
                clone_in.add((id(L.module), c))
            if o._version != ov and not L.clone_out[c]:
                clone_out.add((id(L.module), c))
    foreign = set(uses.foreign)
    if drop or clone_in or clone_out or foreign:
        what = []
        if drop:
            what.append(f"{len(drop)} layer(s) ran a different number of times or on other shapes than planned")
        if foreign:
            what.append(f"parameters used outside their layer: {sorted(foreign)}")
        if clone_in or clone_out:
            what.append("captured tensors changed in place")
        raise PlanMismatch("; ".join(what), drop=drop, foreign=foreign, clone_in=clone_in, clone_out=clone_out,
                           reprobe=bool(drop))


def revise_plan(plan: Plan, mm: PlanMismatch) -> Plan:
    """The plan with what a real call showed: mismatching layers and parameters used outside
    their layer go to the remainder (the generic path, exact for any forward), captured tensors
    changed in place are cloned."""
    plan = _copy_plan(plan)
    layers, remainder = [], list(plan.remainder)
    for L in plan.layers:
        key = id(L.module)
        if key in mm.drop:
            remainder += L.names
            continue
        w, b = _wb(L.module)
        names = dict(zip(("w", "b"), L.names)) if (L.w_on and L.b_on) else ({"w": L.names[0]} if L.w_on else
                                                                            {"b": L.names[0]})
        if L.w_on and names["w"] in mm.foreign:
            L.w_on = False
            remainder.append(names.pop("w"))
        if L.b_on and names["b"] in mm.foreign:
            L.b_on = False
            remainder.append(names.pop("b"))
        if not names:
            continue
        L.names = [names[t] for t in ("w", "b") if t in names]
        L.clone_in = [c or (key, i) in mm.clone_in for i, c in enumerate(L.clone_in)]
        L.clone_out = [c or (key, i) in mm.clone_out for i, c in enumerate(L.clone_out)]
        layers.append(L)
    plan.reasons = dict(plan.reasons)
    for name in remainder:
        plan.reasons.setdefault(name, "moved by a real call: " + (
            "used outside its layer's own forward" if name in mm.foreign else
            "its layer ran a different number of times or on other shapes than planned"))
    plan.layers, plan.remainder = layers, remainder
    plan.revisions = plan.revisions + [mm.reason]
    return plan


# ============================================================================= per-layer factors
def _conv_patches(m, u):
    """Conv input (n, C_in, *S) → (n, g, D, C_in/g·Πkernel) in the weight's flattening order,
    with the layer's own padding (any padding mode) applied exactly as its forward does."""
    nd = u.dim() - 2
    pad = list(m._reversed_padding_repeated_twice)
    if any(pad):
        u = F.pad(u, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    ks, st, dl = m.kernel_size, m.stride, m.dilation
    n, c = u.shape[:2]
    if nd == 2:
        pt = F.unfold(u, ks, dilation=dl, stride=st)  # (n, C·kh·kw, D)
    else:
        for d in range(nd):
            u = u.unfold(2 + d, dl[d] * (ks[d] - 1) + 1, st[d])[..., ::dl[d]]
        perm = [0, 1] + list(range(2 + nd, 2 + 2 * nd)) + list(range(2, 2 + nd))
        pt = u.permute(perm).reshape(n, c * math.prod(ks), -1)
    g = m.groups
    return pt.reshape(n, g, pt.shape[1] // g, pt.shape[2]).transpose(2, 3)


def _uniform(L: _Layer, cap):
    """A linear/conv layer's calls as u (n, g, P, q), δ (k, n, g, P, o), positions of all calls
    concatenated (weight sharing)."""
    us, ds = [], []
    for u, d in cap:
        k, n = d.shape[:2]
        if L.kind == "conv":
            g = L.module.groups
            us.append(_conv_patches(L.module, u) if L.w_on else None)
            ds.append(d.reshape(k, n, g, d.shape[2] // g, -1).transpose(3, 4))
        else:
            us.append(u.reshape(n, 1, -1, u.shape[-1]) if L.w_on else None)
            ds.append(d.reshape(k, n, 1, -1, d.shape[-1]))
    u = None if not L.w_on else (us[0] if len(us) == 1 else torch.cat(us, dim=2))
    d = ds[0] if len(ds) == 1 else torch.cat(ds, dim=3)
    return u, d


def _norm_xhat(m, u):
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(u, m.normalized_shape, None, None, m.eps)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(u, m.num_groups, None, None, m.eps)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return F.batch_norm(u, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
    use_running = m.track_running_stats and not m.training
    return F.instance_norm(u, m.running_mean if use_running else None, m.running_var if use_running else None,
                           None, None, not use_running, 0.0, m.eps)


def _norm_jac(L: _Layer, cap):
    """Per-example gradients of a norm layer's affine parameters: [(n·k, E)] per parameter."""
    m = L.module
    E = m.weight.numel() if m.weight is not None else m.bias.numel()
    jw = jb = None
    for u, d in cap:
        k, n = d.shape[:2]
        if isinstance(m, nn.LayerNorm):
            dd = d.reshape(k, n, -1, E)
            xh = _norm_xhat(m, u).reshape(1, n, -1, E) if L.w_on else None
        else:  # channel dim 1
            dd = d.reshape(k, n, E, -1).transpose(2, 3)
            xh = _norm_xhat(m, u).reshape(1, n, E, -1).transpose(2, 3) if L.w_on else None
        if L.w_on:
            t = (dd * xh).sum(2)
            jw = t if jw is None else jw + t
        if L.b_on:
            t = dd.sum(2)
            jb = t if jb is None else jb + t
    return [t.transpose(0, 1).reshape(-1, t.shape[2]) for t in (jw, jb) if t is not None]


def _custom_jac(L: _Layer, cap):
    """A registered rule's per-example gradients (lazyfast/rules.py): [(n·k, P)] per parameter on."""
    rule = rule_for(L.module)
    grads = rule.per_example_gradients(L.module, cap)
    ps = [L.module._parameters.get(n) for n in rule.params]
    if not isinstance(grads, (list, tuple)) or len(grads) != len(ps):
        raise ValueError(f"the rule for {type(L.module).__name__} returned {type(grads).__name__} "
                         f"{len(grads) if isinstance(grads, (list, tuple)) else ''}: it must return one tensor "
                         f"(k, n, *param.shape) per parameter in {rule.params}")
    k, n = cap[0][1].shape[:2]
    out = []
    for name, p, g, on in zip(rule.params, ps, grads, (L.w_on, L.b_on)):
        if not on:
            continue
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != (k, n) + tuple(p.shape):
            raise ValueError(f"the rule for {type(L.module).__name__} returned for {name!r} "
                             f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}, expected "
                             f"(k, n, *param.shape) = {(k, n) + tuple(p.shape)}")
        out.append(g.detach().to(p.dtype).transpose(0, 1).reshape(n * k, -1))
    return out


def _scale_shift_jac(L: _Layer, cap):
    """Per-example gradients of γ in x·γ (u = x) or β in x + β, γ / β broadcast into the
    per-sample x: [(n·k, P)], summed over the broadcast positions and over the calls."""
    p = L.module.weight if L.kind == "scale" else L.module.bias
    acc = None
    for u, d in cap:
        k, n = d.shape[:2]
        per = d.shape[2:]
        pshape = tuple(p.shape)
        while len(pshape) > len(per):  # leading 1s of a parameter shaped like a whole batch (1, C, 1, 1)
            pshape = pshape[1:]
        pshape = (1,) * (len(per) - len(pshape)) + pshape
        t = d * u.unsqueeze(0) if L.kind == "scale" else d
        dims = [2 + i for i, (a, b) in enumerate(zip(pshape, per)) if a == 1 and b != 1]
        if dims:
            t = t.sum(dims, keepdim=True)
        t = t.reshape(k, n, -1)
        acc = t if acc is None else acc + t
    return [acc.transpose(0, 1).reshape(-1, acc.shape[2])]


def _lin_jac(L: _Layer, u, d):
    """Per-example gradient blocks of a linear/conv layer: [(n·k, P_weight), (n·k, P_bias)]."""
    k, n, g, P, o = d.shape
    parts = []
    if L.w_on:
        j = torch.einsum("aigpo,igpq->iagoq", d, u).reshape(n * k, -1)
        parts.append(j * math.sqrt(L.gamma) if L.gamma != 1.0 else j)
    if L.b_on:
        parts.append(d.sum(3).transpose(0, 1).reshape(n * k, g * o))
    return parts  # separate blocks: concatenating them would copy as much as a contraction reads


def _costs(L: _Layer, n1: int, n2: int, k: int, mode: str) -> Tuple[float, float]:
    """FLOPs of the two contraction orders for a linear/conv layer (per chunk pair)."""
    m = L.module
    g = m.groups if L.kind == "conv" else 1
    o = m.weight.shape[0] // g
    q = m.weight[0].numel()
    P = 0
    for s in L.out_shapes:
        P += math.prod(s[1:]) if L.kind == "conv" else math.prod(s[:-1])
    kk = k * k if mode == "full" else k
    grads = (n1 + n2) * k * g * o * q * P + n1 * n2 * kk * g * o * q
    pairs = n1 * n2 * P * P * (kk * g * o + g * q + (kk if mode == "full" else 1) * g)
    return 2.0 * grads, 2.0 * pairs


@dataclass
class _Factors:
    n: int
    jac: List[torch.Tensor] = field(default_factory=list)       # (n·k, P_l) blocks
    hd: List[torch.Tensor] = field(default_factory=list)        # hadamard: δ (k, n, w)
    hh: List[torch.Tensor] = field(default_factory=list)        # hadamard: u (n, v)
    hg: List[float] = field(default_factory=list)
    hb: List[float] = field(default_factory=list)
    pairs: List[tuple] = field(default_factory=list)            # (layer, u (n,g,P,q), δ (k,n,g,P,o))
    emb: List[tuple] = field(default_factory=list)              # (layer, idx (n,P), δ (k,n,P,dim))


def _is_hadamard(L: _Layer) -> bool:
    return L.kind == "linear" and L.w_on and L.calls == 1 and len(L.in_shapes[0]) == 1


def _factors(model, plan: Plan, x: torch.Tensor, batched: bool, sink=None) -> Optional[_Factors]:
    """The factors of every rule layer for the samples ``x`` (one capture). With ``sink``, each
    layer's factors are handed to ``sink(factors)`` as soon as they are formed and then dropped
    (the single-layer linear stacks of ``hadamard_gram_sum`` go together at the end), so only one
    layer's per-sample gradient block is alive at a time; returns None then."""
    caps = _capture(model, plan, x, batched)
    f = _Factors(x.shape[0])
    for L in plan.layers:
        if sink is not None and (f.jac or f.pairs or f.emb):
            hd, hh, hg, hb = f.hd, f.hh, f.hg, f.hb
            f.hd, f.hh, f.hg, f.hb = [], [], [], []
            sink(f)
            f = _Factors(x.shape[0], hd=hd, hh=hh, hg=hg, hb=hb)
        cap = caps.pop(id(L.module))
        if L.kind == "norm":
            f.jac.extend(_norm_jac(L, cap))
        elif L.kind in ("scale", "shift"):
            f.jac.extend(_scale_shift_jac(L, cap))
        elif L.kind == "custom":
            f.jac.extend(_custom_jac(L, cap))
        elif L.kind == "embedding":
            idx = torch.cat([u.reshape(u.shape[0], -1) for u, _ in cap], dim=1)
            d = torch.cat([dd.reshape(dd.shape[0], dd.shape[1], -1, dd.shape[-1]) for _, dd in cap], dim=2)
            f.emb.append((L, idx, d))
        elif _is_hadamard(L):
            u, d = cap[0]
            f.hd.append(d.contiguous())
            f.hh.append(u.contiguous())
            f.hg.append(L.gamma)
            f.hb.append(1.0 if L.b_on else 0.0)
        else:
            u, d = _uniform(L, cap)
            if L.contraction == "gradients" or not L.w_on:
                f.jac.extend(_lin_jac(L, u, d))
            else:
                f.pairs.append((L, u, d))
        del cap
    if sink is not None:
        if f.jac or f.pairs or f.emb or f.hd:
            sink(f)
        return None
    return f


# ============================================================================= contractions
def _add_jac(acc, j1, j2, k, mode):
    if mode == "full":
        acc.addmm_(j1, j2.T) if acc.dtype == j1.dtype else acc.add_((j1 @ j2.T).to(acc.dtype))
    else:
        a, b = j1.reshape(j1.shape[0] // k, -1), j2.reshape(j2.shape[0] // k, -1)
        acc.addmm_(a, b.T) if acc.dtype == a.dtype else acc.add_((a @ b.T).to(acc.dtype))


def _add_pairs(acc, L, u1, d1, u2, d2, mode, budget):
    k, n1, g, P, o = d1.shape
    n2 = d2.shape[1]
    beta = 1.0 if L.b_on else 0.0
    per_row = (k * P * n2 * k * P if mode == "full" else P * n2 * P) * 2 + P * n2 * P
    c = max(1, min(n1, budget // max(per_row, 1)))
    for gi in range(g):
        if mode == "full":
            e2 = d2[:, :, gi].permute(1, 0, 2, 3).reshape(n2 * k * P, o)
        else:
            e2 = d2[:, :, gi].permute(1, 2, 0, 3).reshape(n2 * P, k * o)
        v2 = u2[:, gi].reshape(n2 * P, -1)
        for i0 in range(0, n1, c):
            i1 = min(i0 + c, n1)
            m = (u1[i0:i1, gi].reshape((i1 - i0) * P, -1) @ v2.T).reshape(i1 - i0, P, n2, P)
            if L.gamma != 1.0:
                m.mul_(L.gamma)
            if beta:
                m.add_(beta)
            if mode == "full":
                e1 = d1[:, i0:i1, gi].permute(1, 0, 2, 3).reshape((i1 - i0) * k * P, o)
                gg = (e1 @ e2.T).reshape(i1 - i0, k, P, n2, k, P)
                blk = torch.einsum("iapjbq,ipjq->iajb", gg, m).reshape((i1 - i0) * k, n2 * k)
                acc[i0 * k:i1 * k].add_(blk.to(acc.dtype))
            else:
                e1 = d1[:, i0:i1, gi].permute(1, 2, 0, 3).reshape((i1 - i0) * P, k * o)
                gg = (e1 @ e2.T).reshape(i1 - i0, P, n2, P)
                acc[i0:i1].add_((gg * m).sum((1, 3)).to(acc.dtype))
            del m, gg


def _add_embedding(acc, L, i1, d1, i2, d2, mode, budget, contraction):
    k, n1, P, e = d1.shape
    n2, P2 = d2.shape[1], d2.shape[2]
    pad = L.module.padding_idx
    if pad is not None:
        d1 = d1 * (i1 != pad).to(d1.dtype)[None, :, :, None]
        d2 = d2 * (i2 != pad).to(d2.dtype)[None, :, :, None]
    uniq, inv = torch.unique(torch.cat([i1.reshape(-1), i2.reshape(-1)]), return_inverse=True)
    U = uniq.numel()
    kk = k * k if mode == "full" else k
    grads_cost = (n1 + n2) * k * P * e + n1 * n2 * kk * U * e
    pairs_cost = n1 * n2 * P * P2 * (kk * e + kk)
    if contraction == "auto":
        contraction = "gradients" if grads_cost <= pairs_cost else "pairs"
    if contraction == "gradients":
        inv1, inv2 = inv[:n1 * P].reshape(n1, P), inv[n1 * P:].reshape(n2, P2)

        def scatter(d, inv, n, p):
            s = torch.zeros(n * U, k, e, dtype=d.dtype, device=d.device)
            tgt = (torch.arange(n, device=d.device)[:, None] * U + inv).reshape(-1)
            s.index_add_(0, tgt, d.permute(1, 2, 0, 3).reshape(n * p, k, e))
            return s.reshape(n, U, k, e).transpose(1, 2).reshape(n * k, U * e)

        _add_jac(acc, scatter(d1, inv1, n1, P), scatter(d2, inv2, n2, P2), k, mode)
        return
    eq = (i1.reshape(n1, P, 1, 1) == i2.reshape(1, 1, n2, P2)).to(d1.dtype)
    if mode == "full":
        gg = (d1.permute(1, 0, 2, 3).reshape(n1 * k * P, e) @ d2.permute(1, 0, 2, 3).reshape(n2 * k * P2, e).T)
        blk = torch.einsum("iapjbq,ipjq->iajb", gg.reshape(n1, k, P, n2, k, P2), eq).reshape(n1 * k, n2 * k)
    else:
        gg = (d1.permute(1, 2, 0, 3).reshape(n1 * P, k * e) @ d2.permute(1, 2, 0, 3).reshape(n2 * P2, k * e).T)
        blk = (gg.reshape(n1, P, n2, P2) * eq).sum((1, 3))
    acc.add_(blk.to(acc.dtype))


def _contract(acc, f1: _Factors, f2: Optional[_Factors], k, mode, budget, emb_contraction):
    """Adds Θ(chunk1, chunk2) into acc ((n1·k, n2·k) full, (n1, n2) trace, sums over a);
    f2 None: the symmetric diagonal block."""
    same = f2 is None
    f2 = f1 if same else f2
    for j1, j2 in zip(f1.jac, f2.jac):
        _add_jac(acc, j1, j2, k, mode)
    if f1.hd:
        from lazyfast._ops.hadamard_gram import hadamard_gram_sum

        if same:
            t = hadamard_gram_sum(f1.hd, f1.hh, h_scale=f1.hg, beta=f1.hb, mode=mode)
        else:
            t = hadamard_gram_sum(f1.hd, f1.hh, f2.hd, f2.hh, h_scale=f1.hg, beta=f1.hb, mode=mode)
        if mode == "full":
            acc.add_(t.permute(0, 2, 1, 3).reshape(acc.shape).to(acc.dtype))
        else:
            acc.add_((t * k).to(acc.dtype))
    for (L, u1, d1), (_, u2, d2) in zip(f1.pairs, f2.pairs):
        _add_pairs(acc, L, u1, d1, u2, d2, mode, budget)
    for (L, i1, d1), (_, i2, d2) in zip(f1.emb, f2.emb):
        _add_embedding(acc, L, i1, d1, i2, d2, mode, budget, emb_contraction)


def _factor_numel(plan: Plan) -> Tuple[int, int]:
    """Per sample: (numbers held by the factors, transient numbers of a capture)."""
    k = plan.k
    held, trans = 0, plan.act_numel * 2
    for L in plan.layers:
        ins = sum(math.prod(s) for s in L.in_shapes)
        outs = sum(math.prod(s) for s in L.out_shapes)
        trans += ins + k * outs
        if L.kind == "conv" and L.w_on:
            trans += L.module.weight[0].numel() * sum(math.prod(s[1:]) for s in L.out_shapes)
        if L.kind in ("norm", "scale", "shift", "custom") or (
                L.kind in ("linear", "conv") and (L.contraction == "gradients" or not L.w_on) and not _is_hadamard(L)):
            held += k * sum(p.numel() for p in _wb(L.module) if p is not None)
        elif L.kind == "conv":
            held += k * outs + L.module.weight[0].numel() * sum(math.prod(s[1:]) for s in L.out_shapes)
        else:
            held += ins + k * outs
    return held, trans


def choose_contractions(plan: Plan, n1: int, n2: int, mode: str, contraction: str = "auto") -> List[str]:
    """Sets (and returns) each layer's contraction order for chunk pairs of n1 × n2 samples."""
    out = []
    for L in plan.layers:
        fixed = _fixed_order(L, contraction)
        if fixed is not None:
            L.contraction = fixed
        else:
            gc, pc = _costs(L, n1, n2, plan.k, mode)
            L.contraction = "gradients" if gc <= pc else "pairs"
        out.append(L.contraction)
    return out


def _fixed_order(L: _Layer, contraction: str) -> Optional[str]:
    """The contraction order of a layer whose order is not the FLOP model's to choose (None: it is)."""
    if L.kind in ("norm", "scale", "shift", "custom") or (L.kind in ("linear", "conv") and not L.w_on):
        return "gradients"
    if L.kind == "embedding":
        return contraction  # chosen per chunk pair by _add_embedding when "auto"
    if _is_hadamard(L):
        return "pairs"
    return None if contraction == "auto" else contraction


def structured_cost(plan: Plan, n1: int, n2: int, mode: str) -> float:
    """FLOP estimate of the rule part: captures (forward + k-wide backward) and contractions."""
    k = plan.k
    choose_contractions(plan, n1, n2, mode)
    total = (n1 + n2) * (1 + 2 * k) * plan.forward_flops
    for L in plan.layers:
        if L.kind in ("linear", "conv") and L.w_on and not _is_hadamard(L):
            total += min(_costs(L, n1, n2, k, mode))
        elif L.kind in ("linear", "conv", "norm", "scale", "shift", "custom"):
            p = sum(t.numel() for t in _wb(L.module) if t is not None)
            total += 2.0 * n1 * n2 * k * (k if mode == "full" else 1) * p
    return total


def _flippable(L: _Layer) -> bool:
    return L.kind in ("linear", "conv") and L.w_on and not _is_hadamard(L)


def _layer_orders(plan: Plan, n_cap: float, pairs: float, mode: str, contraction: str,
                  set_orders: bool = True) -> float:
    """The FLOP model of the contractions of a kernel of ``pairs`` sample pairs whose samples are
    captured ``n_cap`` times in all (a per-sample gradient block is formed once per capture).
    With ``set_orders``, first sets each layer's order to its cheaper one (``contraction="auto"``)
    or to ``contraction``."""
    k = plan.k
    total = 0.0
    for L in plan.layers:
        if _flippable(L):
            jf, _ = _costs(L, 1, 0, k, mode)  # forming one sample's gradient block
            jc, sc = _costs(L, 1, 1, k, mode)
            grads, pair_grams = n_cap * jf + pairs * (jc - 2 * jf), pairs * sc
            if set_orders:
                L.contraction = _fixed_order(L, contraction) or ("gradients" if grads <= pair_grams else "pairs")
            total += grads if L.contraction == "gradients" else pair_grams
        else:
            if set_orders:
                L.contraction = _fixed_order(L, contraction)
            p = sum(t.numel() for t in _wb(L.module) if t is not None)
            total += 2.0 * pairs * k * (k if mode == "full" else 1) * p
    return total


def _schedule(plan: Plan, n1: int, n2: int, same: bool, budget: int, c0: int, mode: str,
              contraction: str = "auto") -> Tuple[int, int]:
    """Chunk size c, panel size (samples of x1 whose factors are held at once, a multiple of c)
    and each layer's contraction order, minimising the FLOP model of the whole kernel within
    ``budget`` numbers (sets the orders). Every x1 sample is captured once, in its panel; x2's
    chunks are captured once per panel (x2=None: only the chunks after the panel), so a bigger
    panel means fewer recaptures; a smaller c, or a layer in the position-pair order (whose
    factors are smaller than its per-sample gradients), leaves more of the budget to the panel.

    Working memory: panel·held + c·(held + transients of one capture) ≤ budget."""
    capture = (1 + 2 * plan.k) * plan.forward_flops  # per sample: forward + k-wide backward
    pairs = n1 * (n1 + 1) / 2 if same else n1 * n2

    def evaluate(c):
        held, trans = _factor_numel(plan)
        if c > 1 and c * (held + trans) > budget:
            return None
        fit = (budget - c * (held + trans)) // max(held, 1)
        panel = n1 if fit >= n1 else max(c, (fit // c) * c)
        npanel = -(-n1 // panel)
        if same:  # panel q recaptures the samples after it
            n_cap = n1 + sum(max(0, n1 - (q + 1) * panel) for q in range(npanel))
        else:
            n_cap = n1 + n2 * npanel
        blocks = (-(-n1 // c)) * (-(-n2 // c)) / (2 if same else 1)
        # a block costs its kernel launches and Python too (~5e6 FLOPs-equivalent per layer)
        cost = (n_cap * capture + _layer_orders(plan, n_cap, pairs, mode, contraction, set_orders=False)
                + blocks * 5e6 * len(plan.layers))
        return cost, panel

    cands = sorted({c0} | {c for c in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if c < c0}, reverse=True)
    best = None
    for c in cands:
        _layer_orders(plan, n1 + (0 if same else n2), pairs, mode, contraction)  # per layer, no recapture
        cur = evaluate(c)
        if contraction == "auto" and cur is not None and cur[1] < n1:
            # recaptures: greedily move layers to the order that improves the whole (memory included)
            for _ in range(len(plan.layers)):
                trial = None
                for L in plan.layers:
                    if not _flippable(L):
                        continue
                    old = L.contraction
                    L.contraction = "pairs" if old == "gradients" else "gradients"
                    r = evaluate(c)
                    if r is not None and r[0] < (trial[0][0] if trial else cur[0]):
                        trial = (r, L, L.contraction)
                    L.contraction = old
                if trial is None:
                    break
                cur, trial[1].contraction = trial[0], trial[2]
        if cur is None and c > 1:
            continue
        if cur is None:
            cur = (float("inf"), c)
        if best is None or cur[0] < 0.9 * best[0]:  # a smaller chunk must win clearly (GEMM efficiency)
            best = (cur[0], c, cur[1], [L.contraction for L in plan.layers])
    _, c, panel, orders = best
    for L, m in zip(plan.layers, orders):
        L.contraction = m
    return c, panel


# ============================================================================= the engine
def _check_budget(memory_budget):
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")


def structured_ntk(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, chunk_size: Optional[int] = None,
                   contraction: str = "auto", out_dtype: Optional[torch.dtype] = None, flat: bool = False,
                   info: Optional[dict] = None, batched: bool = True, plan: Optional[Plan] = None,
                   remainder: str = "auto") -> torch.Tensor:
    """Exact eNTK of any module by per-layer rules plus the generic path for the rest.

    Args:
        x1: (n1, ...); x2: (n2, ...) or None for x1 (only chunk pairs J ≥ I are computed).
        mode: ``"trace"`` → (n1, n2) = (1/k)·Σ_a Θ_aa; ``"full"`` → (n1, n2, k, k), or
            (n1·k, n2·k) with row k·i + a when ``flat=True``.
        memory_budget: bytes of working memory (captures, factors, per-layer blocks); samples
            are chunked to stay within it.
        chunk_size: caps the samples per chunk.
        contraction: per-layer contraction order: ``"auto"`` (FLOP model), ``"gradients"``
            (per-example gradient blocks) or ``"pairs"`` (position-pair Grams) for every layer.
        out_dtype: dtype the kernel is accumulated and returned in (default the model's).
        info: filled with ``contractions`` (per rule layer), ``layers`` (module class names),
            ``remainder`` (parameter names left to the generic path), ``k``, ``chunk``.
        batched: one batched backward for the k outputs (False: a loop over the outputs).
        remainder: implementation of the generic path for uncovered parameters.

    Returns a plain tensor (no autograd graph).
    """
    from lazyfast._engine.generic import generic_ntk, math_attention

    if contraction not in CONTRACTIONS:
        raise ValueError(f"contraction must be one of {CONTRACTIONS}, got {contraction!r}")
    if mode not in ("trace", "full"):
        raise ValueError(f"mode must be 'trace' or 'full', got {mode!r}")
    _check_budget(memory_budget)
    check_independent(model)
    same = x2 is None
    xb = x1 if same else x2
    n1, n2 = x1.shape[0], xb.shape[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters (requires_grad=True): its tangent kernel is empty")
    dtype = trainable[0].dtype
    out_dtype = out_dtype or dtype
    xp = x1 if n1 else xb

    def compute(plan):
        k = plan.k
        if info is not None:
            info.update(k=k, layers=[type(L.module).__name__ for L in plan.layers], remainder=list(plan.remainder))
        if n1 == 0 or n2 == 0:
            shape = (n1 * k, n2 * k) if (mode == "full" and flat) else (n1, n2) if mode == "trace" else (n1, n2, k, k)
            if info is not None:
                info.update(contractions=[], chunk=0)
            return torch.zeros(shape, dtype=out_dtype, device=x1.device)
        itemsize = torch.empty((), dtype=dtype).element_size()
        budget = max(1, memory_budget // itemsize)
        rows = k if mode == "full" else 1
        acc = torch.zeros(n1 * rows, n2 * rows, dtype=out_dtype, device=x1.device)
        if plan.layers:
            n_max = max(n1, n2)
            c0 = min(n_max, chunk_size or n_max)
            c, panel = _schedule(plan, n1, n2, same, budget, c0, mode, contraction)
            if info is not None:
                info.update(contractions=[L.contraction for L in plan.layers], chunk=c, panel=panel,
                            cached=panel >= n1 and same)
            starts1 = list(range(0, n1, c))
            starts2 = starts1 if same else list(range(0, n2, c))
            step = max(1, panel // c)  # x1 chunks per panel
            if same and len(starts1) == 1:  # one chunk: each layer is contracted as soon as it is formed
                def sink(f):
                    with torch.no_grad():
                        _contract(acc, f, None, k, mode, budget, contraction)

                _factors(model, plan, x1, batched, sink=sink)
                starts1 = []
            for p0 in range(0, len(starts1), step):
                # the panel's factors are captured once and held; x2's chunks stream past them
                held = {i: _factors(model, plan, x1[starts1[i]:min(starts1[i] + c, n1)], batched)
                        for i in range(p0, min(p0 + step, len(starts1)))}
                for j in range(p0 if same else 0, len(starts2)):
                    s2 = starts2[j]
                    e2 = min(s2 + c, n2)
                    f2 = held[j] if (same and j in held) else _factors(model, plan, xb[s2:e2], batched)
                    with torch.no_grad():
                        for i, f1 in held.items():
                            if same and i > j:
                                continue
                            s1 = starts1[i]
                            e1 = min(s1 + c, n1)
                            blk = torch.zeros((e1 - s1) * rows, (e2 - s2) * rows, dtype=out_dtype, device=x1.device)
                            _contract(blk, f1, None if (same and i == j) else f2, k, mode, budget, contraction)
                            acc[s1 * rows:e1 * rows, s2 * rows:e2 * rows] = blk
                            if same and i != j:
                                acc[s2 * rows:e2 * rows, s1 * rows:e1 * rows] = blk.T
                    del f2
                held.clear()
        elif info is not None:
            info.update(contractions=[], chunk=0)
        if plan.remainder:
            kw = dict(mode=mode, memory_budget=memory_budget, names=plan.remainder, k=k,
                      forward_flops=plan.forward_flops, act_numel=plan.act_numel)
            try:
                rest = generic_ntk(model, x1, x2, implementation=remainder, **kw)
            except ValueError as e:
                # per-sample vmap cannot follow the forward (e.g. Hugging Face GPT-2 branches on
                # `pad_token_id in input_ids`): NTK-vector products vmap over cotangent columns
                # instead, with the samples unbatched (attention by SDPA's math backend, whose
                # forward-mode derivative exists)
                if remainder == "ntk_vp" or "cannot differentiate this model" not in str(e):
                    raise
                with math_attention():
                    rest = generic_ntk(model, x1, x2, implementation="ntk_vp", **kw)
                if info is not None:
                    info["remainder_fallback"] = f"ntk_vp ({str(e).splitlines()[0][:120]})"
            if mode == "full":
                acc += rest.permute(0, 2, 1, 3).reshape(acc.shape).to(out_dtype)
            else:
                acc += (rest * k).to(out_dtype)

        return acc, k

    with StateGuard(model):
        if plan is None:
            plan = make_plan(model, xp)
        for attempt in range(5):
            try:
                res = compute(plan)
                break
            except PlanMismatch as mm:
                if attempt == 4:
                    raise RuntimeError(f"lazyfast internal error: the plan still disagrees with the real call after "
                                       f"{attempt} revisions ({mm.reason}); use implementation='jacobian'") from mm
                plan = probe_plan(model, xp) if (mm.reprobe and attempt == 0) else revise_plan(plan, mm)
                remember_plan(model, xp, plan)
                if info is not None:
                    info.setdefault("revisions", []).append(mm.reason)
        if not isinstance(res, tuple):
            return res
        acc, k = res
    with torch.no_grad():
        if same:  # exact symmetry
            acc = 0.5 * (acc + acc.T)
        if mode == "trace":
            return (acc / k).detach()
        if flat:
            return acc.detach()
        return acc.reshape(n1, k, n2, k).permute(0, 2, 1, 3).contiguous().detach()


_register_builtin_rules()
