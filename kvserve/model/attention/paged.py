"""The paged attention backend: K/V live in fixed-size blocks that each sequence's table points to.

Every step writes the new tokens' K/V into their slots (the metadata's slot mapping), then attends:
a decode-only batch goes through one C call that reads blocks where they lie (kernels/gemv.c) when
on CPU; anything else (prefill, chunked prefill over cached blocks, CUDA) gathers only the blocks
each sequence uses and runs the PyTorch attention, which is also the reference the C path is
tested against. Which blocks a sequence owns is the block manager's call; the tables arrive in
the step's metadata.
"""

from __future__ import annotations

import torch

from kvserve.kernels import cpu as cpu_kernels
from kvserve.kvstore.paged import PagedKVStore
from kvserve.model.attention.metadata import AttentionMetadata
from kvserve.model.attention.ops import attention_sdpa


class PagedAttention:
    retains_kv = True
    use_fast_decode = True  # tests switch the C decode attention off to compare with PyTorch

    def __init__(self, store: PagedKVStore):
        self.store = store
        self._scores = torch.empty(0, dtype=torch.float32)  # workspace of the C decode kernel

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.paged is None:
            raise RuntimeError("a paged step needs block tables and a slot mapping")
        if self._fast_ok(meta):
            need = len(meta.seqs) * self.store.layout.spec.num_heads * meta.max_context_len
            if self._scores.numel() < need:
                self._scores = torch.empty(max(need, 2 * self._scores.numel()),
                                           dtype=torch.float32)

    def _fast_ok(self, meta: AttentionMetadata) -> bool:
        return (self.use_fast_decode and self.store.device.type == "cpu" and meta.is_decode
                and self.store.dtype in (torch.float32, torch.bfloat16)
                and cpu_kernels.available())

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        paged = meta.paged
        keys, values = self.store.keys(layer_idx), self.store.values(layer_idx)
        num_kv, d = k.shape[1], k.shape[2]
        # Write this step's K/V into their slots: [num_slots, num_kv, d] views of the store.
        keys.view(-1, num_kv, d).index_copy_(0, paged.slot_mapping, k.to(keys.dtype))
        values.view(-1, num_kv, d).index_copy_(0, paged.slot_mapping, v.to(values.dtype))
        if q.dtype == torch.float32 and self._fast_ok(meta):
            return cpu_kernels.paged_decode_attention(q, keys, values, paged.block_tables,
                                                      paged.context_lens, meta.max_context_len,
                                                      self._scores)
        return self._attend_gathered(q, keys, values, meta)

    def _attend_gathered(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        paged = meta.paged
        for i, s in enumerate(meta.seqs):
            rows = slice(s.row_start, s.row_start + s.num_new_tokens)
            index = paged.block_tables[i, :paged.num_blocks[i]]
            # Only this sequence's blocks: [n_blocks * block_size, kv, d] -> [kv, L, d]
            k_seq = keys.index_select(0, index).flatten(0, 1)[:s.context_len].transpose(0, 1)
            v_seq = values.index_select(0, index).flatten(0, 1)[:s.context_len].transpose(0, 1)
            out[rows] = attention_sdpa(q[rows], k_seq.to(q.dtype), v_seq.to(q.dtype))
        return out

    def release(self, seq_id: str) -> None:
        """Blocks are returned by the block manager: nothing is kept per sequence here."""

    def num_bytes_allocated(self) -> int:
        return self.store.num_bytes_allocated()
