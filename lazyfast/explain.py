"""``lazyfast.explain``: what ``empirical_ntk(implementation="auto")`` would do with a model, and why
(docs/engine.md): the path each parameter takes (a layer rule and its contraction order, or the
generic remainder with the reason no rule takes it), the FLOP model's numbers behind the choice,
and the memory plan (chunk and panel sizes, factor numbers per sample).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from lazyfast._engine import structured, two_layer
from lazyfast._engine.outputs import with_output
from lazyfast._validation import DEFAULT_MEMORY_BUDGET, check_input, check_memory_budget, check_mode, check_module
from lazyfast.ntk import choose_implementation

__all__ = ["Explanation", "explain"]


@dataclass
class Explanation:
    """What a kernel call would run. ``parameters``: one dict per trainable parameter (``name``,
    ``numel``, ``path`` = ``"rule"`` or ``"remainder"``, ``layer``, ``rule``, ``contraction`` (the
    layer's contraction order: ``"gradients"``, ``"pairs"``, or for an embedding ``"auto"``, chosen per
    chunk pair among ``"gradients"``, ``"pairs"`` and ``"matches"``), ``reason``);
    ``implementation``: the route ``"auto"`` takes; ``costs``: the FLOP model's estimates;
    ``schedule``: chunk, panel and the factor / transient numbers per sample; ``k``."""
    implementation: str
    k: int
    parameters: List[dict] = field(default_factory=list)
    costs: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)
    n1: int = 0
    n2: Optional[int] = None
    mode: str = "trace"

    @property
    def rule_fraction(self) -> float:
        """The share of trainable numbers on layer rules."""
        tot = sum(p["numel"] for p in self.parameters)
        return sum(p["numel"] for p in self.parameters if p["path"] == "rule") / max(tot, 1)

    def __str__(self) -> str:
        lines = [f"empirical_ntk(implementation='auto') on n1={self.n1}, n2={self.n2 or 'x1'}, mode={self.mode!r}, "
                 f"k={self.k}: {self.implementation}",
                 f"parameters on layer rules: {100 * self.rule_fraction:.2f} % of "
                 f"{sum(p['numel'] for p in self.parameters)} numbers"]
        if self.costs:
            lines.append("FLOP model: " + ", ".join(f"{k} {v:.3g}" for k, v in self.costs.items()))
        if self.schedule:
            lines.append("memory plan: " + ", ".join(f"{k} {v}" for k, v in self.schedule.items()))
        w = max([len(p["name"]) for p in self.parameters] + [9])
        lines.append(f"{'parameter':<{w}}  {'numbers':>9}  path")
        for p in self.parameters:
            if p["path"] == "rule":
                what = f"rule {p['rule']} [{p['layer']}], contraction {p['contraction']}"
            else:
                what = f"remainder (generic path): {p['reason']}"
            lines.append(f"{p['name']:<{w}}  {p['numel']:>9}  {what}")
        return "\n".join(lines)


def explain(model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None, *, mode: str = "trace",
            memory_budget: int = DEFAULT_MEMORY_BUDGET, output_fn=None) -> Explanation:
    """Explains the route of ``empirical_ntk(model, x1, x2, mode=mode, implementation="auto")``
    without computing the kernel (it probes the model: forwards on copies of one sample).

    Returns an :class:`Explanation`; ``print(lazyfast.explain(model, x))`` shows it as a table."""

    check_module(model)
    model = with_output(model, output_fn)
    check_input(x1, "x1", model, allow_integer=True)
    if x2 is not None:
        check_input(x2, "x2", model, like=x1, allow_integer=True)
    check_mode(mode)
    memory_budget = check_memory_budget(memory_budget)
    n1 = x1.shape[0]
    n2 = None if x2 is None else x2.shape[0]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if two_layer.fused_applicable(model):
        return Explanation("fused", int(model.out_features),
                           [dict(name=n, numel=p.numel(), path="rule", layer="<model>", rule="fused two-layer",
                                 contraction="fused", reason="") for n, p in named], n1=n1, n2=n2, mode=mode)
    info: dict = {}
    impl, plan = choose_implementation(model, x1, x2, mode=mode, memory_budget=memory_budget, info=info)
    plan = structured._copy_plan(plan)
    nb = n1 if n2 is None else n2
    sched = {}
    if plan.layers and n1 and nb:
        itemsize = named[0][1].element_size() if named else 4
        c, panel = structured._schedule(plan, n1, nb, n2 is None, max(1, memory_budget // itemsize), max(n1, nb),
                                        mode)
        held, trans = structured._factor_numel(plan)
        sched = dict(chunk=c, panel=panel, factor_numbers_per_sample=held, transient_numbers_per_sample=trans)
    by_name = {}
    for L in plan.layers:
        if L.site is not None:  # an operator rule: the op, wherever it is called
            label, rule = f"op {L.site[0]}", f"operator {L.site[0]}"
        else:
            label, rule = structured.module_name(model, L.module), f"{L.kind} ({type(L.module).__name__})"
        for name in L.names:
            by_name[name] = dict(layer=label, rule=rule, contraction=L.contraction)
    params = []
    for n, p in named:
        if n in by_name:
            params.append(dict(name=n, numel=p.numel(), path="rule", reason="", **by_name[n]))
        else:
            params.append(dict(name=n, numel=p.numel(), path="remainder", layer="", rule="", contraction="",
                               reason=plan.reasons.get(n, "no rule covers it")))
    costs = dict(info.get("costs", {}))
    return Explanation("structured" if impl == "structured" else "generic", plan.k, params, costs, sched,
                       n1=n1, n2=n2, mode=mode)
