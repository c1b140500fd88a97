"""Turns a StepPlan into the step's tensors: token ids, positions, the rows whose logits are
sampled, and the attention metadata (slot mapping, block tables, context lengths) every layer
reads. Built once per step; nothing here decides who runs (the scheduler did).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
        """Index arithmetic runs in numpy on the host (a numpy call costs ~1 us, a small torch
        op 5-10 us, and a decode step builds a dozen); the tensors are then moved once."""
        token_ids: list[int] = []
        seqs = []
        for s in plan.seqs:
            seqs.append(SeqSlice(s.request_id, len(token_ids), len(s.token_ids), s.start_position))
            token_ids.extend(s.token_ids)
        num_tokens = len(token_ids)
        num_new = np.fromiter((s.num_new_tokens for s in seqs), np.int64, len(seqs))
        # Each row's position: its sequence's start_position + its offset within the sequence.
        shift = np.fromiter((s.start_position - s.row_start for s in seqs), np.int64, len(seqs))
        positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(shift, num_new)
        paged, groups = None, ()
        if self.block_size is not None:
            paged = self._paged([s.block_ids for s in plan.seqs], plan, seqs, positions, num_new)
            num_groups = len(plan.seqs[0].group_block_ids) if plan.seqs else 0
            groups = tuple(self._paged([s.group_block_ids[g] for s in plan.seqs], plan, seqs,
                                       positions, num_new) for g in range(num_groups))
        meta = AttentionMetadata(tuple(seqs), num_tokens, paged, groups)
        return StepInputs(self._tensor(np.array(token_ids, dtype=np.int64)),
                          self._tensor(positions), meta)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(array)
        return t if self.device.type == "cpu" else t.to(self.device)

    def _paged(self, block_ids: list[tuple[int, ...]], plan: StepPlan, seqs: list[SeqSlice],
               positions: np.ndarray, num_new: np.ndarray) -> PagedMetadata:
        """One table per sequence (block_ids: the plan's, or one KV group's) into tensors."""
        bs = self.block_size
        num_blocks = []
        for s, ids, sl in zip(plan.seqs, block_ids, seqs):
            need = -(-sl.context_len // bs)
            if len(ids) < need:
                raise RuntimeError(f"sequence {s.request_id} has {len(ids)} blocks for "
                                   f"{sl.context_len} tokens")
            num_blocks.append(need)
        width = max(len(ids) for ids in block_ids)
        tables = np.zeros((len(seqs), width), dtype=np.int32)  # [num_seqs, max_blocks]
        for row, ids in zip(tables, block_ids):
            row[:len(ids)] = ids
        # A released block (HOLE, -1: outside every layer's window) reads as block 0, which
        # attention masks out (and the pool's zeroed or written blocks keep finite).
        np.maximum(tables, 0, out=tables)
        context_lens = torch.from_numpy(
            np.fromiter((sl.context_len for sl in seqs), np.int32, len(seqs)))
        # slot of each new token = its block (from its sequence's table) * block_size + offset
        seq_of_row = np.repeat(np.arange(len(seqs)), num_new)  # [num_tokens]
        slot_mapping = tables[seq_of_row, positions // bs].astype(np.int64) * bs + positions % bs
        block_tables = self._tensor(tables)
        return PagedMetadata(bs, self._tensor(slot_mapping), block_tables, context_lens,
                             tuple(num_blocks), _decode_rows(seqs, block_tables, context_lens))


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
