"""The attention seam: the model hands each layer's new Q/K/V to a backend and gets outputs back.

A backend owns where K/V live (nowhere, one growing tensor per sequence, paged blocks, quantized
blocks...); the model never holds cache tensors. Batches are flat: tokens of several sequences are
concatenated, and `StepBatch` says which rows belong to which sequence and at which positions.
This module also holds the attention math itself: a plain reference and the SDPA fast path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's rows in a flat step batch.

    Rows [row_start, row_start + num_new_tokens) of the batch hold this sequence's positions
    [start_position, start_position + num_new_tokens): the K/V of [0, start_position) must already
    be in the backend's store (none for the no-cache backend, which always starts at 0).
    """

    seq_id: str
    row_start: int
    num_new_tokens: int
    start_position: int

    @property
    def context_len(self) -> int:
        return self.start_position + self.num_new_tokens


@dataclass(frozen=True)
class StepBatch:
    seqs: tuple[SeqSlice, ...]
    num_tokens: int


class AttentionBackend(Protocol):
    """What the model calls once per layer. Implementations: cache/dense.py (none, contiguous)."""

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim]
        -> [num_tokens, num_heads, head_dim]; stores k/v for later steps if it keeps a cache."""
        ...


def causal_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """Bool [num_queries, num_keys]: query i sits at key position num_keys - num_queries + i."""
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=device).unsqueeze(1)
    return torch.arange(num_keys, device=device).unsqueeze(0) <= q_pos


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal GQA attention for one sequence, computed in float32.

    q [n, num_heads, d]; k, v [L, num_kv_heads, d] with the n queries at positions [L - n, L).
    """
    n, num_heads, d = q.shape
    group = num_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()  # [L, num_heads, d]
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) / d ** 0.5  # [num_heads, n, L]
    scores = scores.masked_fill(~causal_mask(n, k.shape[0], q.device), float("-inf"))
    out = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)
    return out.to(q.dtype)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same as attention_reference through torch's fused SDPA kernel.

    q [n, num_heads, d]; k, v [num_kv_heads, L, d] (head-major: the layout the caches keep).
    """
    n, num_kv = q.shape[0], k.shape[0]
    length = k.shape[1]
    group = q.shape[1] // num_kv
    # Fold each KV head's query group into the query-length axis: [num_kv, group * n, d], so the
    # K/V heads are read as they are, never repeated.
    qg = q.reshape(n, num_kv, group, -1).permute(1, 2, 0, 3).reshape(num_kv, group * n, -1)
    if n == 1:
        # Decode: one query sees every key, no mask. Three plain ops beat SDPA's dispatch here.
        scores = torch.bmm(qg, k.transpose(1, 2)) * qg.shape[-1] ** -0.5  # [num_kv, group, L]
        out = torch.bmm(scores.softmax(-1), v)
    else:
        mask = causal_mask(n, length, q.device).repeat(group, 1)  # [group * n, L]
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
    # [num_kv, group * n, d] -> [n, num_heads, d]
    return out.reshape(num_kv, group, n, -1).permute(2, 0, 1, 3).reshape(n, q.shape[1], -1)
