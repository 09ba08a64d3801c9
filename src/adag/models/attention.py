"""The attention-score formula, once: used by the model's own forward
(:func:`adag.models.sites.adag_attention`) and by :meth:`adag.models.model.Model.attention_scores`
(the AtP* QK fix, Kramár et al. 2024 §3.1.1, recomputes scores from patched queries and keys).

It performs the same operations in the same order as transformers' eager attention
(``repeat_kv``, ``q @ kᵀ * scaling``, ``softcap * tanh(· / softcap)``, ``+ mask``), so that the
forward stays bit-identical to ``attn_implementation="eager"`` in float32 and bf16 and a
recomputation equals the ``hook_attn_scores`` site exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``batch kv_head pos d -> batch (kv_head n_rep) pos d``: query head h reads KV head
    ``h // n_rep`` (transformers' ``repeat_kv`` layout)."""
    if n_rep == 1:
        return x
    b, kv, t, dh = x.shape
    return x[:, :, None].expand(b, kv, n_rep, t, dh).reshape(b, kv * n_rep, t, dh)


def attention_scores(
    query: Tensor,
    key: Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Scores ``batch head q_pos k_pos`` from queries ``batch head q_pos d_head`` and keys
    ``batch kv_head k_pos d_head`` (grouped-query attention: ``head`` a multiple of ``kv_head``).

    ``mask`` is additive (transformers' eager mask: 0 where attended, the dtype's minimum where
    not). Computed in the inputs' dtype, in eager attention's operation order."""
    k = repeat_kv(key, query.shape[1] // key.shape[1])
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling  # (B, H, T, S)
    if softcap is not None:
        scores = scores / softcap
        scores = torch.tanh(scores)
        scores = scores * softcap
    if mask is not None:
        scores = scores + mask
    return scores
