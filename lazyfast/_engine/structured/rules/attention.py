"""The self-attention rule: ``nn.MultiheadAttention``'s packed input projection as a linear layer.

A self-attention ``nn.MultiheadAttention`` (one packed in-projection, no bias_k / bias_v / zero
attention) runs, inside the engine's own probe and capture forwards only, an exact shadow forward
whose projections are modules the brackets see: :class:`_InProj` (``in_proj_weight`` /
``in_proj_bias``, covered by the Linear rule) and ``out_proj``. Cross-attention calls run the real
forward.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


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
        for mha, proj in self.pairs:
            mha.forward = functools.partial(_shadow_attention, mha, proj)
        return self

    def __exit__(self, *exc):
        for mha, _ in self.pairs:
            mha.__dict__.pop("forward", None)
        return False
