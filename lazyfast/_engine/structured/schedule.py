"""The cost model and the scheduler (contraction orders, chunk, panel), and every tuning constant of the engine.

docs/engine.md, "Contraction orders and the cost model" and "Memory".
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

from lazyfast._engine.structured.factors import _is_hadamard
from lazyfast._engine.structured.plan import Plan, _Layer
from lazyfast._engine.structured.rules.builtin import _wb
from lazyfast._validation import DEFAULT_MEMORY_BUDGET  # noqa: F401 (the one default; re-exported)

# ----------------------------------------------------------------------------- tuning constants
CHUNK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # the chunk sizes tried below the largest one
BLOCK_OVERHEAD_FLOPS = 5e6  # a chunk-pair block's kernel launches and Python, per rule layer, in FLOPs
SMALLER_CHUNK_MARGIN = 0.9  # a smaller chunk must cost under this share of the best so far (GEMM efficiency)
PLAN_ATTEMPTS = 5  # forwards of one call before a plan that still disagrees is an internal error
MOVE_FLOPS = 32.0  # an embedding order's number written or gathered (zero fill, copy, scatter), in FLOPs
MATCHES_CHUNK_NUMBERS = 1 << 19  # gathered numbers per step of the embedding's "matches" order (cache-sized)
CAPTURE_NUMBERS = 1 << 25  # transient numbers of one capture outside the one-chunk path (samples per capture)
PAIR_SYMMETRIC_BLOCKS = 4  # row blocks of a diagonal block in the position-pair order (the blocks above it mirrored)
GRAM_DEPTH_CHUNK = 16384  # depth of one float32 GEMM piece of a per-example-gradient Gram (pieces summed in float64)
GRADIENT_SLICE_NUMBERS = 1 << 22  # numbers of one slice of a linear layer's per-example gradients formed and contracted at once


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


def _embedding_costs(n1: int, n2: int, P: int, P2: int, k: int, e: int, U: int, M: int, R: int, mode: str,
                     same: bool) -> dict:
    """Costs (FLOPs, each number moved counted as MOVE_FLOPS) of an Embedding's three contraction
    orders for one chunk pair: P, P2 positions per sample, e channels, U distinct tokens of the
    pair, M matching row pairs and R (sample, token) rows of the "matches" order (``same``: one
    side, each unordered pair once)."""
    kk = k * k if mode == "full" else k
    cells = k * k if mode == "full" else 1  # kernel numbers per sample pair
    scatter = (n1 * P + n2 * P2) * k * e  # the cotangents of both chunks, scattered or copied once
    dense = (n1 + n2) * U * k * e  # the dense per-example gradients: zero fill, then a transposing copy
    grads = 2.0 * n1 * n2 * kk * U * e + MOVE_FLOPS * (scatter + 3 * dense)
    pos = n1 * n2 * P * P2  # position pairs: their Gram written, masked (and, full, permuted)
    pairs = 2.0 * pos * kk * e + MOVE_FLOPS * (scatter + pos * (2 * cells + 1))
    rows = (n1 * P + (0 if same else n2 * P2)) * k * e + 2 * R * k * e  # summed per row, then a copy
    matches = 2.0 * M * kk * e + MOVE_FLOPS * (rows + 2 * M * k * e + 2 * M * cells)  # gathers, scatter
    return dict(gradients=grads, pairs=pairs, matches=matches)


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


def capture_chunk(plan: Plan, c: int) -> int:
    """Samples per capture when a chunk of ``c`` samples is formed for holding (not streamed): the
    largest power of two whose capture transients stay within CAPTURE_NUMBERS, at most ``c``. A
    k-wide backward over a smaller group ran faster on the CPU (the 3-conv CNN, 10 outputs, n = 128:
    8-sample captures against 64-sample ones), its factors being the same numbers."""
    _, trans = _factor_numel(plan)
    cap = max(1, CAPTURE_NUMBERS // max(trans, 1))
    return min(c, 1 << (cap.bit_length() - 1))


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
    """The contraction order of a layer whose order is not the FLOP model's to choose (None: it is).
    "matches" is an embedding order only: the other layers take the FLOP model's choice, as for "auto"."""
    if L.kind in ("norm", "scale", "shift", "custom") or (L.kind in ("linear", "conv") and not L.w_on):
        return "gradients"
    if L.kind == "embedding":
        return contraction  # chosen per chunk pair by _add_embedding when "auto"
    if _is_hadamard(L):
        return "pairs"
    return None if contraction in ("auto", "matches") else contraction


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

    Working memory: panel·held + c·(held + transients of one capture) ≤ budget.

    The result depends only on the plan's layers and these arguments, so it is kept in
    ``plan.schedules`` and reapplied to a later call's copy of the same plan."""
    key = (n1, n2, same, budget, c0, mode, contraction,
           tuple((id(L.module), L.kind, L.w_on, L.b_on, L.calls) for L in plan.layers))
    hit = plan.schedules.get(key)
    if hit is not None:
        c, panel, orders = hit
        for L, m in zip(plan.layers, orders):
            L.contraction = m
        return c, panel
    c, panel = _choose_schedule(plan, n1, n2, same, budget, c0, mode, contraction)
    plan.schedules[key] = (c, panel, [L.contraction for L in plan.layers])
    return c, panel


def _choose_schedule(plan: Plan, n1: int, n2: int, same: bool, budget: int, c0: int, mode: str,
                     contraction: str) -> Tuple[int, int]:
    """:func:`_schedule`'s search, uncached."""
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
        # a block costs its kernel launches and Python too (BLOCK_OVERHEAD_FLOPS per layer)
        cost = (n_cap * capture + _layer_orders(plan, n_cap, pairs, mode, contraction, set_orders=False)
                + blocks * BLOCK_OVERHEAD_FLOPS * len(plan.layers))
        return cost, panel

    cands = sorted({c0} | {c for c in CHUNK_SIZES if c < c0}, reverse=True)
    best = None
    for c in cands:
        _layer_orders(plan, n1 + (0 if same else n2), pairs, mode, contraction)  # per layer, no recapture
        cur = evaluate(c)
        if contraction in ("auto", "matches") and cur is not None and cur[1] < n1:
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
        if best is None or cur[0] < SMALLER_CHUNK_MARGIN * best[0]:  # a smaller chunk must win clearly
            best = (cur[0], c, cur[1], [L.contraction for L in plan.layers])
    _, c, panel, orders = best
    for L, m in zip(plan.layers, orders):
        L.contraction = m
    return c, panel
