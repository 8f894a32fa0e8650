"""The structured eNTK engine: exact per-layer kernels for any ``nn.Module`` (docs/engine.md).

One forward with hooks on the layers that have a rule records each call's input u and raw
output; ONE batched backward (``torch.autograd.grad(..., is_grads_batched=True)``, a loop over
the k outputs only where batching fails) gives every layer's output cotangents δ for all k
outputs at once. Each layer then adds its exact kernel

    Θ_l[(i,a),(j,b)] = Σ_{p,p'} ⟨δ_a(x_i)_p, δ_b(x_j)_p'⟩ · (γ⟨u(x_i)_p, u(x_j)_p'⟩ + 1_bias)

(p: positions; u: the input patch; γ: the squared weight multiplier), by the cheaper of two
exact contraction orders under a FLOP model: per-example gradient blocks ("gradients") or
position-pair Grams ("pairs"); an Embedding chooses per chunk pair among those two and the pairs
of per-sample rows of equal token ("matches"). Single-call 2-D linear layers go through the compiled
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

The modules, each importing only those listed before it:

* :mod:`.rules` — the layer rules: the open registry, the built-in rules, the operator rules, and
  one module per layer family (applies-check, shell, per-layer factor code);
* :mod:`.brackets` — the brackets around rule layers' own forwards;
* :mod:`.plan` — the plan the probe forwards find, its cache and its revision;
* :mod:`.capture` — the capture (one forward, one batched backward) and its check against the plan;
* :mod:`.factors` — each layer's per-sample factors from a capture;
* :mod:`.schedule` — the cost model and the scheduler, and every tuning constant of the engine;
* :mod:`.contract` — a chunk pair's kernel block from the factors;
* :mod:`.loop` — ``structured_ntk``: the chunk / panel loop and the generic remainder.

This package re-exports the names code outside it uses. A module global is read (and patched) in
its own module: ``capture._VERIFY``, ``plan.ParamUses``.
"""
from lazyfast._engine.outputs import ModelForwardError, _batch_like, model_output, output_dim, run_forward  # noqa: F401
from lazyfast._engine.state import (StateGuard, _frozen, _plain_attrs, _simple, check_independent,  # noqa: F401
                                    no_fastpath, unmodified)
from lazyfast._engine.structured import rules  # noqa: F401
from lazyfast._engine.structured.rules import find_rule, rule_for, rule_kind  # noqa: F401
from lazyfast._engine.structured.plan import (CONTRACTIONS, Plan, PlanMismatch, _copy_plan, _Layer,  # noqa: F401
                                              make_plan, module_name, plan_fingerprint, probe_plan, remember_plan,
                                              revise_plan)
from lazyfast._engine.structured.schedule import (DEFAULT_MEMORY_BUDGET, _factor_numel, _schedule,  # noqa: F401
                                                  choose_contractions, structured_cost)
from lazyfast._engine.structured.loop import structured_ntk  # noqa: F401
