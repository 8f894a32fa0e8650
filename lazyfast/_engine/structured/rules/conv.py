"""The Conv rule's own code: a conv input's patches in the weight's flattening order, and its
per-example weight gradients by one grouped convolution backward.

``nn.Conv1d/2d/3d`` (stride, padding of every mode, dilation, groups) take the rule through
:mod:`.builtin`; with its patches a conv layer is a linear layer over output positions per group
(:func:`lazyfast._engine.structured.rules.linear._lin_jac`). In the per-example gradient order, a
layer with few output channels per cotangent block and many positions takes
:func:`_conv_jac` instead (docs/engine.md, "Contraction orders and the cost model").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Where the grouped convolution backward forms a layer's per-example weight gradients instead of
# patches and a batched product (both exact): where it was the faster in measurements on a 2-core
# CPU (float32 and float64); the patches were faster with many output channels per block or few
# positions.
GROUPED_MAX_OUTPUTS = 64  # k·C_out/g of one chunk's cotangents, at most
GROUPED_MIN_POSITIONS = 64  # output positions per sample, at least


def _padded(m, u):
    """The conv input with the layer's own padding (any padding mode) applied as its forward does."""
    pad = list(m._reversed_padding_repeated_twice)
    if any(pad):
        u = F.pad(u, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    return u


def _conv_patches(m, u):
    """Conv input (n, C_in, *S) → (n, g, D, C_in/g·Πkernel) in the weight's flattening order,
    with the layer's own padding (any padding mode) applied exactly as its forward does."""
    nd = u.dim() - 2
    u = _padded(m, u)
    ks, st, dl = m.kernel_size, m.stride, m.dilation
    n, c = u.shape[:2]
    if all(s == 1 for s in ks):  # a pointwise conv: each position's patch is its own channels
        if any(s != 1 for s in st):
            u = u[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in st)]
        pt = u.reshape(n, c, -1)
    elif nd == 2:
        pt = F.unfold(u, ks, dilation=dl, stride=st)  # (n, C·kh·kw, D)
    else:
        for d in range(nd):
            u = u.unfold(2 + d, dl[d] * (ks[d] - 1) + 1, st[d])[..., ::dl[d]]
        perm = [0, 1] + list(range(2 + nd, 2 + 2 * nd)) + list(range(2, 2 + nd))
        pt = u.permute(perm).reshape(n, c * math.prod(ks), -1)
    g = m.groups
    return pt.reshape(n, g, pt.shape[1] // g, pt.shape[2]).transpose(2, 3)


def grouped_pays(m, d) -> bool:
    """Whether :func:`_conv_weight_grads` is the faster way to this call's per-example weight
    gradients, from the cotangents' shape d (k, n, C_out, *S_out)."""
    return (d.shape[0] * (m.out_channels // m.groups) <= GROUPED_MAX_OUTPUTS
            and math.prod(d.shape[3:]) >= GROUPED_MIN_POSITIONS)


def _conv_weight_grads(m, u, d):
    """Per-example weight gradients of one conv call, (n·k, C_out·C_in/g·Πkernel) in the weight's
    flattening order, rows k·i + a: torch's own conv weight-gradient kernel with the samples as
    groups (input (1, n·C_in, *S) padded as the forward pads it, cotangents (1, n·g·k·o, *S_out),
    groups n·g), so no patches are formed."""
    k, n = d.shape[:2]
    g, nd = m.groups, u.dim() - 2
    o = m.out_channels // g
    u = _padded(m, u)
    c = u.shape[1]
    spatial = tuple(range(4, 4 + nd))
    go = d.reshape((k, n, g, o) + tuple(d.shape[3:])).permute((1, 2, 0, 3) + spatial)
    go = go.reshape((1, n * g * k * o) + tuple(d.shape[3:]))
    shape = (n * g * k * o, c // g) + tuple(m.kernel_size)
    w = torch.empty((1,) * len(shape), dtype=u.dtype, device=u.device).expand(shape)  # only its shape is read
    gw = torch.ops.aten.convolution_backward(go, u.reshape((1, n * c) + tuple(u.shape[2:])), w, None,
                                             list(m.stride), [0] * nd, list(m.dilation), False, [0] * nd, n * g,
                                             [False, True, False])[1]
    gw = gw.reshape(n, g, k, o, -1)
    return (gw.transpose(1, 2) if g > 1 else gw).reshape(n * k, -1)


def _conv_jac(L, cap):
    """Per-example gradient blocks of a conv layer, [(n·k, P_weight), (n·k, P_bias)], summed over
    its calls, the weight's by :func:`_conv_weight_grads`."""
    m = L.module
    w = b = None
    for u, d in cap:
        k, n = d.shape[:2]
        if L.w_on:
            gw = _conv_weight_grads(m, u, d)
            w = gw if w is None else w.add_(gw)
        if L.b_on:
            gb = d.sum(tuple(range(3, d.dim())))
            b = gb if b is None else b.add_(gb)
    parts = []
    if w is not None:
        parts.append(w.mul_(math.sqrt(L.gamma)) if L.gamma != 1.0 else w)
    if b is not None:
        parts.append(b.transpose(0, 1).reshape(n * k, -1))
    return parts
