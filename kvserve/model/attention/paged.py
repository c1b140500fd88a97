"""The paged attention backend: K/V live in fixed-size blocks that each sequence's table points to.

Every step writes the new tokens' K/V into their slots (the metadata's slot mapping), then attends:
the sequences that feed one token (all of a decode step, the decode part of a mixed one) go through
one C call that reads blocks where they lie (kernels/gemv.c) when on CPU; the rest (prefill,
chunked prefill over cached blocks, anything on CUDA) gathers only the blocks each sequence uses
and runs the PyTorch attention, which is also the reference the C path is
tested against. Which blocks a sequence owns is the block manager's call; the tables arrive in
the step's metadata.
"""

from __future__ import annotations

import torch

from kvserve.kernels import cpu as cpu_kernels
from kvserve.kvstore.paged import PagedKVStore
from kvserve.model.attention.metadata import AttentionMetadata, DecodeRows
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
        decode = meta.paged.decode
        if decode is not None and self._fast_ok():
            need = (decode.context_lens.numel() * self.store.layout.spec.num_heads
                    * decode.max_context_len)
            if self._scores.numel() < need:
                self._scores = torch.empty(max(need, 2 * self._scores.numel()),
                                           dtype=torch.float32)

    def _fast_ok(self) -> bool:
        return (self.use_fast_decode and self.store.device.type == "cpu"
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
        decode = paged.decode
        if decode is None or q.dtype != torch.float32 or not self._fast_ok():
            return self._attend_gathered(q, keys, values, meta, out=None, skip_decode=False)
        if decode.rows is None:  # a decode step: one C call for the whole batch
            return self._decode(q, keys, values, decode)
        # A mixed step: the decodes still take the C kernel; only the prefills gather.
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        out.index_copy_(0, decode.rows,
                        self._decode(q.index_select(0, decode.rows), keys, values, decode))
        return self._attend_gathered(q, keys, values, meta, out=out, skip_decode=True)

    def _decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                decode: DecodeRows) -> torch.Tensor:
        return cpu_kernels.paged_decode_attention(q, keys, values, decode.block_tables,
                                                  decode.context_lens, decode.max_context_len,
                                                  self._scores)

    def _attend_gathered(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         meta: AttentionMetadata, out: torch.Tensor | None,
                         skip_decode: bool) -> torch.Tensor:
        """The PyTorch path (the reference of the C kernel): each sequence's blocks gathered;
        skip_decode leaves the one-token sequences' rows of `out` as they are."""
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        paged = meta.paged
        for i, s in enumerate(meta.seqs):
            if skip_decode and s.num_new_tokens == 1:
                continue
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
