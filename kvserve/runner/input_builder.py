"""Turns a StepPlan into the step's tensors: token ids, positions, the rows whose logits are
sampled, and the attention metadata (slot mapping, block tables, context lengths) every layer
reads. Built once per step; nothing here decides who runs (the scheduler did).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.model.attention.metadata import (
    AttentionMetadata,
    DecodeRows,
    PagedMetadata,
    SeqSlice,
)
from kvserve.scheduler.plan import StepPlan


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] long
    positions: torch.Tensor  # [num_tokens] long
    meta: AttentionMetadata


class InputBuilder:
    def __init__(self, device: torch.device, block_size: int | None = None):
        self.device = device
        self.block_size = block_size  # None: the backend is not paged

    def build(self, plan: StepPlan) -> StepInputs:
        token_ids: list[int] = []
        seqs = []
        for s in plan.seqs:
            seqs.append(SeqSlice(s.request_id, len(token_ids), len(s.token_ids), s.start_position))
            token_ids.extend(s.token_ids)
        num_tokens = len(token_ids)
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        # Each row's position: its sequence's start_position + its offset within the sequence.
        num_new = torch.tensor([s.num_new_tokens for s in seqs], device=self.device)
        shift = torch.tensor([s.start_position - s.row_start for s in seqs], device=self.device)
        # output_size: the length is known, so CUDA need not sync to learn it
        positions = torch.arange(num_tokens, device=self.device) + \
            torch.repeat_interleave(shift, num_new, output_size=num_tokens)  # [num_tokens]
        paged = None
        if self.block_size is not None:
            paged = self._paged(plan, seqs, positions, num_new)
        return StepInputs(input_ids, positions, AttentionMetadata(tuple(seqs), num_tokens, paged))

    def _paged(self, plan: StepPlan, seqs: list[SeqSlice], positions: torch.Tensor,
               num_new: torch.Tensor) -> PagedMetadata:
        bs = self.block_size
        num_blocks = []
        for s, sl in zip(plan.seqs, seqs):
            need = -(-sl.context_len // bs)
            if len(s.block_ids) < need:
                raise RuntimeError(f"sequence {s.request_id} has {len(s.block_ids)} blocks for "
                                   f"{sl.context_len} tokens")
            num_blocks.append(need)
        width = max(len(s.block_ids) for s in plan.seqs)
        tables = [list(s.block_ids) + [0] * (width - len(s.block_ids)) for s in plan.seqs]
        block_tables = torch.tensor(tables, dtype=torch.int32)  # [num_seqs, max_blocks]
        context_lens = torch.tensor([sl.context_len for sl in seqs], dtype=torch.int32)
        block_tables = block_tables.to(self.device)
        # slot of each new token = its block (from its sequence's table) * block_size + offset
        seq_of_row = torch.repeat_interleave(
            torch.arange(len(seqs), device=self.device), num_new,
            output_size=len(positions))  # [num_tokens]
        blocks = block_tables.long()[seq_of_row, positions // bs]
        slot_mapping = blocks * bs + positions % bs  # [num_tokens]
        return PagedMetadata(bs, slot_mapping, block_tables, context_lens, tuple(num_blocks),
                             _decode_rows(seqs, block_tables, context_lens))


def _decode_rows(seqs: list[SeqSlice], block_tables: torch.Tensor,
                 context_lens: torch.Tensor) -> DecodeRows | None:
    """The one-token sequences: the whole batch, a part of it (a mixed step), or none."""
    index = [i for i, s in enumerate(seqs) if s.num_new_tokens == 1]
    if not index:
        return None
    max_len = max(seqs[i].context_len for i in index)
    if len(index) == len(seqs):
        return DecodeRows(None, block_tables, context_lens, max_len)
    device = block_tables.device
    rows = torch.tensor([seqs[i].row_start for i in index], dtype=torch.long, device=device)
    pick = torch.tensor(index, dtype=torch.long)
    return DecodeRows(rows, block_tables.index_select(0, pick.to(device)),
                      context_lens.index_select(0, pick), max_len)
