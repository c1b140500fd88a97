"""The attention backend protocol: the model hands each layer's new Q/K/V to a backend, with the
step's metadata, and gets the attention output back. A backend owns where K/V live (nowhere, one
tensor per sequence, paged blocks); the model never holds cache tensors.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kvserve.model.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Implementations: dense.py (NoCacheAttention, ContiguousAttention), paged.py."""

    # Whether K/V persist between steps; False: every step refeeds whole sequences from 0.
    retains_kv: bool

    def prepare(self, meta: AttentionMetadata) -> None:
        """Check the step against what is stored and make room for its tokens (before the
        forward). Keeps nothing of `meta`."""
        ...

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim]
        -> [num_tokens, num_heads, head_dim]; stores k/v for later steps if it keeps a cache."""
        ...

    def fused_decode(self, meta: AttentionMetadata):
        """The step's store as kernels/cpu.py PagedDecode when the model may run every layer of
        this decode step in one C call that writes and attends itself, else None (then forward()
        per layer). Called after prepare()."""
        ...

    def fuses_decode_steps(self) -> bool:
        """Whether fused_decode_steps can serve this backend's decode steps (its formats and
        options allow it; a given step may still get None)."""
        ...

    def fused_decode_steps(self, meta: AttentionMetadata, num_steps: int):
        """fused_decode for num_steps decode steps back to back from this one (a multi-step
        plan: each sequence's table holds slots for them): this step's PagedDecode with scores
        scratch for the last step's context, or None as fused_decode. Called after
        prepare()."""
        ...

    def release(self, seq_id: str) -> None:
        """Forget K/V the backend keeps per sequence (paged blocks are the block manager's)."""
        ...

    def num_bytes_allocated(self) -> int:
        """Bytes of K/V storage the backend holds now."""
        ...
