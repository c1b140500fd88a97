"""Per-step attention metadata: which rows of the flat batch belong to which sequence, where each
new token's K/V goes and which blocks each sequence reads. Built once per step by the runner's
input builder and passed to every layer; backends read it and keep none of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
class DecodeRows:
    """The sequences of a step that feed one token each, for a decode kernel: all of a decode
    step's (rows None: the batch's own tables), or the decode part of a mixed step, whose
    prefills then take the general path while the decodes keep the fast one."""

    rows: torch.Tensor | None  # [m] long: their rows in the flat batch; None: every row
    block_tables: torch.Tensor  # [m, max_blocks] int32
    context_lens: torch.Tensor  # [m] int32, on the CPU
    max_context_len: int


@dataclass(frozen=True)
class PagedMetadata:
    """Where K/V live in the paged pool for this step (paged backends only)."""

    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] long: slot = block_id * block_size + offset
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, each row padded with block 0
    context_lens: torch.Tensor  # [num_seqs] int32, on the CPU (the C decode kernel reads it)
    num_blocks: tuple[int, ...]  # blocks each sequence reads: ceil(context_len / block_size)
    decode: DecodeRows | None = None  # the one-token sequences, when there are any


@dataclass(frozen=True)
class AttentionMetadata:
    seqs: tuple[SeqSlice, ...]
    num_tokens: int
    paged: PagedMetadata | None = None
    # With several KV groups (kvcache/groups.py): the paged metadata of the groups after the
    # first (`paged` is the first's), from their own block tables
    paged_groups: tuple[PagedMetadata, ...] = ()
    # Derived once here, read by every layer: every sequence feeds one token; the longest context
    is_decode: bool = field(init=False)
    max_context_len: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_decode", all(s.num_new_tokens == 1 for s in self.seqs))
        object.__setattr__(self, "max_context_len", max(s.context_len for s in self.seqs))

    def paged_of(self, group: int) -> PagedMetadata | None:
        """The paged metadata of KV group `group` (0: `paged`)."""
        return self.paged if group == 0 else self.paged_groups[group - 1]

    @classmethod
    def single(cls, seq_id: str, num_new_tokens: int, start_position: int = 0
               ) -> AttentionMetadata:
        """One unpaged sequence feeding num_new_tokens from start_position (tests, references)."""
        return cls((SeqSlice(seq_id, 0, num_new_tokens, start_position),), num_new_tokens)
