"""The plan: what the probe forwards found (rule layers, remainder, k, costs), its cache and its revisions.

:func:`make_plan` probes a model (:func:`probe_plan`: forwards on one and two copies of one sample)
or reuses the cached plan while :func:`plan_fingerprint` is unchanged; a real call that disagrees
raises :class:`PlanMismatch` (:mod:`.capture`) and :func:`revise_plan` moves what disagreed to the
generic remainder (docs/engine.md, "Capture", "Exact on every call").
"""
from __future__ import annotations

import copy
import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.modules import module as _mod
from torch.utils.flop_counter import FlopCounterMode

from lazyfast._engine.outputs import _batch_like, model_output, run_forward
from lazyfast._engine.state import StateGuard, _frozen, _simple
from lazyfast._engine.structured.brackets import _Brackets
from lazyfast._engine.structured.rules.attention import _InProj, _Shadows, _attention_rule_applies
from lazyfast._engine.structured.rules.builtin import _wb, rule_kind
from lazyfast._engine.structured.rules.ops import _OP_KIND, _op_shell, match_op
from lazyfast._engine.structured.rules.registry import rule_for
from lazyfast._engine.uses import ParamUses, alias_message

# a layer's contraction order: "gradients" (per-example gradient blocks J1 J2ᵀ) or "pairs"
# (position-pair Grams); "auto" lets the FLOP model choose (docs/engine.md, "Contraction orders");
# "matches" (an Embedding's pairs of per-sample token rows) is an embedding order only: the other
# layers take their "auto" choice under it
CONTRACTIONS = ("auto", "gradients", "pairs", "matches")


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
    contraction: str = "gradients"  # "gradients" | "pairs" (an embedding: also "matches", or "auto": per chunk pair)
    gamma: float = 1.0
    site: Optional[tuple] = None  # an operator rule's (kind, id(weight), id(bias)); None: a module rule
    folds: List[int] = field(default_factory=list)  # per call: rows per sample when the batch is folded
    # per call: a shared call (an Embedding on indices without the batch, e.g. position ids (1, L)),
    # its output broadcast to every sample (docs/engine.md, "Shared calls")
    shared: List[bool] = field(default_factory=list)


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
    # the scheduler's choices for this plan (chunk, panel, orders) by call size, shared by the plan's
    # copies: a cost-model result, never a check (schedule._schedule)
    schedules: dict = field(default_factory=dict)


class PlanMismatch(Exception):
    """The real call disagreed with the plan (internal: the engine revises the plan and reruns)."""

    def __init__(self, reason: str, drop=(), foreign=(), clone_in=(), clone_out=(), reprobe: bool = False):
        super().__init__(reason)
        self.reason, self.drop, self.foreign = reason, set(drop), set(foreign)
        self.clone_in, self.clone_out, self.reprobe = set(clone_in), set(clone_out), reprobe


def plan_fingerprint(model: nn.Module, x: torch.Tensor) -> tuple:
    """Everything a :class:`Plan` depends on: the per-sample input shape, dtype and device; every
    module's identity, class, training flag, instance-level ``forward``, hooks and plain attributes
    (numbers, strings, dtypes and short lists / tuples / dicts of them: stride, padding, eps,
    batch_first, weight_multiplier, ...); every parameter's identity, shape,
    dtype, device and ``requires_grad``; buffer shapes; the global module hooks. Parameter *values*
    are not part of it (a plan does not depend on them)."""
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
    # parameters no module rule takes may be taken by an operator rule (rules/ops.py, match_op)
    site_params = {id(p) for p in trainable.values() if id(p) not in owner and owners.get(id(p), 0) <= 1}
    site_recs: Dict[tuple, list] = {}
    site_meta: Dict[tuple, dict] = {}
    site_foreign, bad_keys, spread_bad = set(), set(), set()

    def record_site(key, inp, out, meta):
        if site_meta.setdefault(key, meta).get("view_shape") != meta.get("view_shape"):
            bad_keys.add(key)  # the calls of one site take its parameter through views of other shapes
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
                uses = ParamUses(model, owner, stack, site_params=site_params, record_site=record_site,
                                 match=match_op)
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
            spread_bad |= {key for key in uses.shared_bad if isinstance(key, tuple)}  # broadcast sites
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
        if key in spread_bad:
            for i in ids:
                reasons[name_of[i]] = ("an operator rule (broadcast) would take it, but its expansion over the batch is "
                                       "used other than by a batch-wise op (elementwise, a copy, or a concatenation "
                                       "along a non-batch dim)")
            continue
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
                fold, shared = 1, False
                if bd is None and _shared_call(s1, s2, o1, o2, L):
                    bd, shared = 0, True
                if bd is None and L.site is not None and L.kind == "linear" and len(s1) == 2 and len(o1) == 2 \
                        and s2[0] == 2 * s1[0] and o2[0] == 2 * o1[0] == 2 * s1[0] and s1[1:] == s2[1:]:
                    # the batch folded into the rows, (n·F, in) (x.view(-1, d) before an addmm)
                    bd, fold = 0, s1[0]
                    s1, o1 = (1,) + s1, (1,) + o1
                if bd is None:
                    ok = False
                    break
                L.folds.append(fold)
                L.shared.append(shared)
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
    for L in _shared_misused(model, x, [L for L in layers if any(L.shared)]):
        layers.remove(L)
        for name in L.names:
            covered.discard(name)
            reasons[name] = ("its Embedding runs on indices without the batch (shared by all samples) and its "
                             "output is used other than by a batch-wise elementwise op")
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


def _shared_misused(model: nn.Module, x: torch.Tensor, layers: List[_Layer]) -> List[_Layer]:
    """The layers among ``layers`` (each with a shared call) whose expanded shared output is used
    other than by a batch-wise elementwise op, seen on a forward of two copies of one sample with the
    capture's expansion (the capture checks the same on every real call)."""
    if not layers:
        return []
    by_id = {id(L.module): L for L in layers}
    count = {i: 0 for i in by_id}
    uses = ParamUses(model, {}, [])

    def record(m, inp, out):
        L, c = by_id[id(m)], count[id(m)]
        count[id(m)] += 1
        if c < len(L.shared) and L.shared[c] and isinstance(out, torch.Tensor) and out.dim() >= 1 \
                and out.shape[0] == 1:
            return expand_shared(uses, out, 2, id(m))
        return None

    with StateGuard(model), torch.enable_grad(), _Brackets([L.module for L in layers], [], record), \
            uses:
        run_forward(model, _batch_like(x, 2), shown=x)
    return [L for L in layers if id(L.module) in uses.shared_bad]


def expand_shared(uses: ParamUses, out: torch.Tensor, n: int, key) -> torch.Tensor:
    """A shared call's output (1, ...) as its own copy for each of the ``n`` samples, its consumers
    watched by ``uses`` under ``key`` (docs/engine.md, "Shared calls"); the probe and the capture both
    expand through here."""
    z = out.expand((n,) + tuple(out.shape[1:])).contiguous()
    uses.watch_shared(z, key)
    return z


def _shared_call(s1, s2, o1, o2, L) -> bool:
    """A call of an Embedding module whose input and output do not change with the batch and
    lead with a dim of 1 (position ids (1, L) → (1, L, dim)): the same rows for every sample,
    broadcast into the batch by the forward. The capture expands the output to the batch and
    confirms on every call that only batch-wise elementwise ops consume it."""
    return (L.kind == "embedding" and L.site is None and s1 == s2 and o1 == o2 and len(s1) >= 1
            and len(o1) == len(s1) + 1 and s1[0] == 1 and o1[0] == 1)


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
    plan.schedules = {}
    return plan
