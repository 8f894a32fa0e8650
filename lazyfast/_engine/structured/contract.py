"""The contractions: a chunk pair's kernel block from the two chunks' factors, each layer in its order.
"""
from __future__ import annotations

from typing import Optional

import torch

from lazyfast._engine.structured.factors import _Factors
from lazyfast._engine.structured.schedule import (GRADIENT_SLICE_NUMBERS, GRAM_DEPTH_CHUNK, MATCHES_CHUNK_NUMBERS,
                                                  PAIR_SYMMETRIC_BLOCKS, _embedding_costs)
from lazyfast._ops.hadamard_gram import hadamard_gram_sum


def _gram_into(acc, a, b, alpha: float = 1.0):
    """acc += alpha · a bᵀ over a long depth (a, b: (rows, depth)). Below float64, the product goes in
    depth pieces of GRAM_DEPTH_CHUNK, each a GEMM in the blocks' dtype, summed in float64: one float32
    GEMM over a depth of millions accumulates its rounding (on the BN-free ResNet-18 of the zoo the
    per-example-gradient Grams lost three digits that way; tests/test_structured.py)."""
    depth = a.shape[1]
    if a.dtype == torch.float64 or depth <= GRAM_DEPTH_CHUNK:
        if acc.dtype == a.dtype:
            acc.addmm_(a, b.T, alpha=alpha)
        else:
            acc.add_((a @ b.T).to(acc.dtype), alpha=alpha)
        return
    part = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for s in range(0, depth, GRAM_DEPTH_CHUNK):
        part.add_(a[:, s:s + GRAM_DEPTH_CHUNK] @ b[:, s:s + GRAM_DEPTH_CHUNK].T)
    acc.add_(part.to(acc.dtype), alpha=alpha)


def _add_jac(acc, j1, j2, k, mode):
    if mode == "full":
        _gram_into(acc, j1, j2)
    else:
        _gram_into(acc, j1.reshape(j1.shape[0] // k, -1), j2.reshape(j2.shape[0] // k, -1))


def _add_sliced(acc, L, u, d, mode):
    """A linear layer's weight term of a chunk's diagonal block, Σ_a J_a J_aᵀ (trace) or J Jᵀ (full),
    with its per-example gradients J(x_i)_a = Σ_p δ_{a,p} u_pᵀ formed GRADIENT_SLICE_NUMBERS at a
    time over the input features (one reused buffer) and contracted slice by slice: the same
    products as the whole block, without writing and re-reading n·k·P_weight numbers."""
    k, n, P, o = d.shape
    q = u.shape[-1]
    dt = d.permute(1, 0, 3, 2).reshape(n, k * o, P)  # (n, k·o, P): one copy of δ
    qc = max(1, min(q, GRADIENT_SLICE_NUMBERS // max(1, n * k * o)))
    buf = torch.empty(n, k * o, qc, dtype=d.dtype, device=d.device)
    rows = n * k if mode == "full" else n
    for s in range(0, q, qc):
        e = min(q, s + qc)
        b = torch.bmm(dt, u[:, :, s:e], out=buf if e - s == qc else None)
        a = b.reshape(rows, -1)
        _gram_into(acc, a, a, alpha=L.gamma)


def _add_pairs(acc, L, u1, d1, u2, d2, mode, budget):
    """Adds a linear/conv layer's block in the position-pair order. On a chunk's diagonal block
    (u2 is u1, d2 is d1) the rows go in PAIR_SYMMETRIC_BLOCKS blocks of samples, each against the
    samples from its own first one on, and the blocks above the diagonal are mirrored: about
    (1 + 1/blocks)/2 of the products of the whole square."""
    k, n1, g, P, o = d1.shape
    n2 = d2.shape[1]
    same = u2 is u1 and d2 is d1
    beta = 1.0 if L.b_on else 0.0
    per_row = (k * P * n2 * k * P if mode == "full" else P * n2 * P) * 2 + P * n2 * P
    c = max(1, min(n1, budget // max(per_row, 1)))
    if same:
        c = min(c, max(1, -(-n1 // PAIR_SYMMETRIC_BLOCKS)))
    r = k if mode == "full" else 1  # kernel rows per sample
    for gi in range(g):
        if mode == "full":
            e2 = d2[:, :, gi].permute(1, 0, 2, 3).reshape(n2 * k * P, o)
        else:
            e2 = d2[:, :, gi].permute(1, 2, 0, 3).reshape(n2 * P, k * o)
        v2 = u2[:, gi].reshape(n2 * P, -1)
        for i0 in range(0, n1, c):
            i1 = min(i0 + c, n1)
            j0 = i0 if same else 0  # first sample of the columns
            nj = n2 - j0
            m = (u1[i0:i1, gi].reshape((i1 - i0) * P, -1) @ v2[j0 * P:].T).reshape(i1 - i0, P, nj, P)
            if L.gamma != 1.0:
                m.mul_(L.gamma)
            if beta:
                m.add_(beta)
            if mode == "full":
                e1 = d1[:, i0:i1, gi].permute(1, 0, 2, 3).reshape((i1 - i0) * k * P, o)
                gg = (e1 @ e2[j0 * k * P:].T).reshape(i1 - i0, k, P, nj, k, P)
                blk = torch.einsum("iapjbq,ipjq->iajb", gg, m).reshape((i1 - i0) * k, nj * k)
            else:
                e1 = d1[:, i0:i1, gi].permute(1, 2, 0, 3).reshape((i1 - i0) * P, k * o)
                gg = (e1 @ e2[j0 * P:].T).reshape(i1 - i0, P, nj, P)
                blk = (gg * m).sum((1, 3))
            blk = blk.to(acc.dtype)
            acc[i0 * r:i1 * r, j0 * r:].add_(blk)
            if same and i1 < n2:  # the samples after the block: their rows are this block's columns
                acc[i1 * r:, i0 * r:i1 * r].add_(blk[:, (i1 - i0) * r:].T)
            del m, gg, blk


def _token_keys(idx, pad):
    """A chunk's positions idx (n, P) keyed by (token, sample): (tokens, samples) of its R distinct
    keys, the rows of the "matches" order, sorted by token then sample; each position's row
    (``inv``); ``drop``: 1 where positions at ``pad`` are present (they share a first row, -1, left
    out of the R), else 0."""
    n, P = idx.shape
    tok = idx.reshape(-1)
    key = tok * n + torch.arange(n, device=idx.device).repeat_interleave(P)
    if pad is not None:
        key = torch.where(tok == pad, torch.full_like(key, -1), key)
    keys, inv = torch.unique(key, return_inverse=True)
    drop = int(pad is not None and keys.numel() > 0 and bool(keys[0] < 0))
    keys = keys[drop:]
    return keys // n, keys % n, inv, drop


def _merged(d, inv, rows, drop):
    """The cotangents d (k, n, P, e) summed per key: G (rows, k, e), the padding row left out."""
    k, n, P, e = d.shape
    g = torch.zeros(k, rows + drop, e, dtype=d.dtype, device=d.device)
    g.index_add_(1, inv, d.reshape(k, n * P, e))
    return g[:, drop:].transpose(0, 1).contiguous()


def _runs(tok1, tok2, same):
    """For each row r1 of side 1, the rows of side 2 with its token: [lo, lo + count) (tok2 sorted).
    ``same`` (one side): only r2 ≥ r1, each unordered pair once."""
    hi = torch.searchsorted(tok2, tok1, right=True)
    lo = torch.arange(tok1.numel(), device=tok1.device) if same else torch.searchsorted(tok2, tok1)
    return lo, hi - lo


def _pair_lists(lo, count, m):
    """The m matching row pairs (r1, r2) of :func:`_runs`, vectorized."""
    r1 = torch.repeat_interleave(torch.arange(lo.numel(), device=lo.device), count, output_size=m)
    start = torch.cumsum(count, 0) - count
    return r1, torch.arange(m, device=lo.device) - start[r1] + lo[r1]


def _add_matches(acc, side1, side2, runs, m, n1, n2, mode, budget):
    """The "matches" order: over the m row pairs (r1, r2) of equal token, ⟨G1[r1], G2[r2]⟩ (trace,
    over k and e) or G1[r1] G2[r2]ᵀ (full, k × k) added at (sample1, sample2); a side is (samples,
    G (R, k, e)). The pairs go in steps whose gathered rows stay within ``budget`` numbers and
    MATCHES_CHUNK_NUMBERS (cache-sized). ``side2`` None: one side, each unordered pair once, added
    at both (sample1, sample2) and (sample2, sample1)."""
    s1, g1 = side1
    s2, g2 = side1 if side2 is None else side2
    _, k, e = g1.shape
    r1, r2 = _pair_lists(*runs, m)
    kk = k * k if mode == "full" else 1
    buf = torch.zeros(n1 * n2, kk, dtype=g1.dtype, device=g1.device)
    c = max(1, min(budget, MATCHES_CHUNK_NUMBERS) // (2 * k * e + 2 * kk))
    for a in range(0, m, c):
        p1, p2 = r1[a:a + c], r2[a:a + c]
        x1, x2 = g1.index_select(0, p1), g2.index_select(0, p2)
        if mode == "full":
            v = torch.bmm(x1, x2.transpose(1, 2))
        else:
            v = torch.linalg.vecdot(x1.reshape(x1.shape[0], -1), x2.reshape(x2.shape[0], -1))
        v = v.reshape(-1, kk)
        i1, i2 = s1[p1], s2[p2]
        if side2 is None:
            v = v * torch.where(p1 == p2, 0.5, 1.0).to(v.dtype)[:, None]
            vt = v if mode == "trace" else v.reshape(-1, k, k).transpose(1, 2).reshape(-1, kk)
            buf.index_add_(0, i2 * n2 + i1, vt)
        buf.index_add_(0, i1 * n2 + i2, v)
    if mode == "full":
        buf = buf.reshape(n1, n2, k, k).permute(0, 2, 1, 3).reshape(n1 * k, n2 * k)
    acc.add_(buf.reshape(acc.shape).to(acc.dtype))


def _add_embedding(acc, L, i1, d1, i2, d2, mode, budget, contraction):
    """Adds an Embedding weight's kernel block Σ_{p,q} [i1_p = i2_q]·⟨δ1_p, δ2_q⟩ (padding positions
    left out) in the order ``contraction``: "gradients" (per-example gradients, dense on the U
    distinct tokens of the chunk pair), "pairs" (position pairs), "matches" (per-sample rows of
    equal token, the pairs of rows with a token in common) or "auto" (the cheapest of the three by
    :func:`~lazyfast._engine.structured.schedule._embedding_costs`). i2 is i1 and d2 is d1: the
    symmetric diagonal block."""
    k, n1, P, e = d1.shape
    n2, P2 = d2.shape[1], d2.shape[2]
    same = i2 is i1 and d2 is d1
    pad = L.module.padding_idx
    if contraction in ("auto", "matches"):
        t1, s1, inv1, drop1 = _token_keys(i1, pad)
        t2, s2, inv2, drop2 = (t1, s1, inv1, drop1) if same else _token_keys(i2, pad)
        runs = _runs(t1, t2, same)
        m = int(runs[1].sum())
        if contraction == "auto":
            u = torch.unique(torch.cat([i1.reshape(-1), i2.reshape(-1)])).numel()
            costs = _embedding_costs(n1, n2, P, P2, k, e, u, m, t1.numel() + (0 if same else t2.numel()),
                                     mode, same)
            contraction = min(costs, key=costs.get)
        if contraction == "matches":
            side1 = (s1, _merged(d1, inv1, t1.numel(), drop1))
            side2 = None if same else (s2, _merged(d2, inv2, t2.numel(), drop2))
            _add_matches(acc, side1, side2, runs, m, n1, n2, mode, budget)
            return
    if pad is not None:
        d1 = d1 * (i1 != pad).to(d1.dtype)[None, :, :, None]
        d2 = d2 * (i2 != pad).to(d2.dtype)[None, :, :, None]
    if contraction == "gradients":
        _add_dense_gradients(acc, i1, d1, i2, d2, mode)
    else:
        _add_position_pairs(acc, i1, d1, i2, d2, mode)


def _add_dense_gradients(acc, i1, d1, i2, d2, mode):
    """The "gradients" order: each sample's gradient scattered into a dense (n·k, U·e) matrix over
    the U distinct tokens of the chunk pair, then J1 J2ᵀ."""
    k, n1, P, e = d1.shape
    n2, P2 = d2.shape[1], d2.shape[2]
    uniq, inv = torch.unique(torch.cat([i1.reshape(-1), i2.reshape(-1)]), return_inverse=True)
    U = uniq.numel()
    inv1, inv2 = inv[:n1 * P].reshape(n1, P), inv[n1 * P:].reshape(n2, P2)

    def scatter(d, inv, n, p):
        s = torch.zeros(n * U, k, e, dtype=d.dtype, device=d.device)
        tgt = (torch.arange(n, device=d.device)[:, None] * U + inv).reshape(-1)
        s.index_add_(0, tgt, d.permute(1, 2, 0, 3).reshape(n * p, k, e))
        return s.reshape(n, U, k, e).transpose(1, 2).reshape(n * k, U * e)

    _add_jac(acc, scatter(d1, inv1, n1, P), scatter(d2, inv2, n2, P2), k, mode)


def _add_position_pairs(acc, i1, d1, i2, d2, mode):
    """The "pairs" order: all position-pair dot products ⟨δ1_p, δ2_q⟩, masked by token equality."""
    k, n1, P, e = d1.shape
    n2, P2 = d2.shape[1], d2.shape[2]
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
        if same:
            t = hadamard_gram_sum(f1.hd, f1.hh, h_scale=f1.hg, beta=f1.hb, mode=mode)
        else:
            t = hadamard_gram_sum(f1.hd, f1.hh, f2.hd, f2.hh, h_scale=f1.hg, beta=f1.hb, mode=mode)
        if mode == "full":
            acc.add_(t.permute(0, 2, 1, 3).reshape(acc.shape).to(acc.dtype))
        else:
            acc.add_((t * k).to(acc.dtype))
    if f1.sliced:
        assert same, "sliced gradient blocks are only formed for a chunk's diagonal block"
        for L, u, d in f1.sliced:
            _add_sliced(acc, L, u, d, mode)
    for (L, u1, d1), (_, u2, d2) in zip(f1.pairs, f2.pairs):
        _add_pairs(acc, L, u1, d1, u2, d2, mode, budget)
    for (L, i1, d1), (_, i2, d2) in zip(f1.emb, f2.emb):
        _add_embedding(acc, L, i1, d1, i2, d2, mode, budget, emb_contraction)
