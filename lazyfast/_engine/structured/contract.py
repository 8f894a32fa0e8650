"""The contractions: a chunk pair's kernel block from the two chunks' factors, each layer in its order.
"""
from __future__ import annotations

from typing import Optional

import torch

from lazyfast._engine.structured.factors import _Factors
from lazyfast._ops.hadamard_gram import hadamard_gram_sum


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
