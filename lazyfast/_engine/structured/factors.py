"""The factors: each rule layer's per-sample pieces of the kernel, formed from one capture.

Per layer, in its contraction order: per-example gradient blocks (n·k, P_l), position-pair factors
(u, δ), the single-call linear stacks of ``hadamard_gram_sum``, an embedding's indices and δ.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from lazyfast._engine.structured.capture import _capture
from lazyfast._engine.structured.plan import Plan, _Layer
from lazyfast._engine.structured.rules.conv import _conv_jac, _conv_patches, grouped_pays
from lazyfast._engine.structured.rules.custom import _custom_jac
from lazyfast._engine.structured.rules.embedding import _embedding_factors
from lazyfast._engine.structured.rules.linear import _bias_jac, _lin_jac
from lazyfast._engine.structured.rules.norm import _norm_jac
from lazyfast._engine.structured.rules.scale import _scale_shift_jac


@dataclass
class _Factors:
    """The factors of n samples, by how they are contracted (:func:`lazyfast._engine.structured.contract._contract`)."""
    n: int
    jac: List[torch.Tensor] = field(default_factory=list)       # (n·k, P_l) blocks
    hd: List[torch.Tensor] = field(default_factory=list)        # hadamard: δ (k, n, w)
    hh: List[torch.Tensor] = field(default_factory=list)        # hadamard: u (n, v)
    hg: List[float] = field(default_factory=list)
    hb: List[float] = field(default_factory=list)
    pairs: List[tuple] = field(default_factory=list)            # (layer, u (n,g,P,q), δ (k,n,g,P,o))
    emb: List[tuple] = field(default_factory=list)              # (layer, idx (n,P), δ (k,n,P,dim))
    sliced: List[tuple] = field(default_factory=list)           # (layer, u (n,P,q), δ (k,n,P,o)): weight blocks


def _is_hadamard(L: _Layer) -> bool:
    """A single-call linear layer on 2-D inputs: contracted by the compiled ``hadamard_gram_sum`` op."""
    return L.kind == "linear" and L.w_on and L.calls == 1 and len(L.in_shapes[0]) == 1


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


def _merge(parts: List[_Factors]) -> _Factors:
    """The factors of consecutive sample groups as the factors of all their samples, in order."""
    if len(parts) == 1:
        return parts[0]
    a = parts[0]
    f = _Factors(sum(p.n for p in parts), hg=a.hg, hb=a.hb)
    f.jac = [torch.cat(js) for js in zip(*(p.jac for p in parts))]
    f.hd = [torch.cat(ds, dim=1) for ds in zip(*(p.hd for p in parts))]
    f.hh = [torch.cat(hs) for hs in zip(*(p.hh for p in parts))]
    f.pairs = [(ls[0][0], torch.cat([t[1] for t in ls]), torch.cat([t[2] for t in ls], dim=1))
               for ls in zip(*(p.pairs for p in parts))]
    f.emb = [(ls[0][0], torch.cat([t[1] for t in ls]), torch.cat([t[2] for t in ls], dim=1))
             for ls in zip(*(p.emb for p in parts))]
    return f


def _factors(model, plan: Plan, x: torch.Tensor, batched: bool, sink=None,
             capture_chunk: Optional[int] = None) -> Optional[_Factors]:
    """The factors of every rule layer for the samples ``x`` (one capture). With ``sink``, each
    layer's factors are handed to ``sink(factors)`` as soon as they are formed and then dropped
    (the single-layer linear stacks of ``hadamard_gram_sum`` go together at the end), so only one
    layer's per-sample gradient block is alive at a time; returns None then.

    Without ``sink``, ``capture_chunk`` caps the samples of one capture: the factors of more
    samples are formed ``capture_chunk`` samples at a time (each capture verified on its own) and
    joined, so a chunk contracted as one block need not be captured as one (docs/engine.md, "Memory")."""
    n = x.shape[0]
    if sink is None and capture_chunk is not None and n > capture_chunk:
        return _merge([_factors(model, plan, x[s:s + capture_chunk], batched) for s in range(0, n, capture_chunk)])
    caps = _capture(model, plan, x, batched)
    f = _Factors(x.shape[0])
    for L in plan.layers:
        if sink is not None and (f.jac or f.pairs or f.emb or f.sliced):
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
            idx, d = _embedding_factors(cap)
            f.emb.append((L, idx, d))
        elif _is_hadamard(L):
            u, d = cap[0]
            f.hd.append(d.contiguous())
            f.hh.append(u.contiguous())
            f.hg.append(L.gamma)
            f.hb.append(1.0 if L.b_on else 0.0)
        elif L.kind == "conv" and L.w_on and L.contraction == "gradients" and all(
                grouped_pays(L.module, d) for _, d in cap):
            f.jac.extend(_conv_jac(L, cap))
        else:
            u, d = _uniform(L, cap)
            if sink is not None and L.kind == "linear" and L.contraction == "gradients" and L.w_on:
                # one chunk, contracted with itself as soon as formed: the weight's per-example
                # gradients are formed and contracted in slices, never whole
                f.sliced.append((L, u[:, 0], d[:, :, 0]))
                if L.b_on:
                    f.jac.append(_bias_jac(d))
            elif L.contraction == "gradients" or not L.w_on:
                f.jac.extend(_lin_jac(L, u, d))
            else:
                f.pairs.append((L, u, d))
        del cap
    if sink is not None:
        if f.jac or f.pairs or f.emb or f.hd or f.sliced:
            sink(f)
        return None
    return f
