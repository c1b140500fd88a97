"""The paged attention backend: K/V live in fixed-size blocks that each sequence's table points to.

Every step writes the new tokens' K/V into their slots (slot = block_id * block_size + offset),
then attends: a decode-only batch goes through one C call that reads blocks where they lie
(kernels/gemv.c) when on CPU; anything else (prefill, chunked prefill over cached blocks, CUDA)
gathers only the blocks each sequence uses and runs the PyTorch attention, which is also the
reference the C path is tested against. Which blocks a sequence owns is the BlockManager's call.
"""

from __future__ import annotations

import torch

from kvserve.cache.kv_storage import PagedKVStorage
from kvserve.kernels import cpu as cpu_kernels
from kvserve.model.attention import StepBatch, attention_sdpa


class PagedCache:
    retains_kv = True
    use_fast_decode = True  # tests switch the C decode attention off to compare with PyTorch

    def __init__(self, storage: PagedKVStorage):
        self.storage = storage
        self.block_size = storage.layout.block_size
        self.batch: StepBatch | None = None
        self.slot_mapping: torch.Tensor | None = None
        self._decode: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._gather_index: list[torch.Tensor] | None = None
        self._scores = torch.empty(0, dtype=torch.float32)

    def begin_step(self, batch: StepBatch) -> None:
        device = self.storage.kv.device
        bs = self.block_size
        slots = []
        for s in batch.seqs:
            if len(s.block_ids) * bs < s.context_len:
                raise RuntimeError(f"sequence {s.seq_id} has {len(s.block_ids)} blocks for "
                                   f"{s.context_len} tokens")
            # new tokens [start_position, context_len) -> their slots
            slots.extend(s.block_ids[p // bs] * bs + p % bs
                         for p in range(s.start_position, s.context_len))
        self.slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)  # [num_tokens]
        self.batch = batch
        self._decode = self._decode_inputs(batch) if self._fast_ok(batch) else None
        # Block indices of each sequence's used blocks, built once per step, not once per layer.
        self._gather_index = None if self._decode is not None else [
            torch.tensor(s.block_ids[:-(-s.context_len // bs)], dtype=torch.long, device=device)
            for s in batch.seqs]

    def _fast_ok(self, batch: StepBatch) -> bool:
        return (self.use_fast_decode and self.storage.kv.device.type == "cpu"
                and all(s.num_new_tokens == 1 for s in batch.seqs)
                and self.storage.kv.dtype in (torch.float32, torch.bfloat16)
                and cpu_kernels.available())

    def _decode_inputs(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, int]:
        max_blocks = max(len(s.block_ids) for s in batch.seqs)
        tables = [list(s.block_ids) + [0] * (max_blocks - len(s.block_ids)) for s in batch.seqs]
        block_tables = torch.tensor(tables, dtype=torch.int32)  # [batch, max_blocks]
        context_lens = torch.tensor([s.context_len for s in batch.seqs], dtype=torch.int32)
        max_context = max(s.context_len for s in batch.seqs)
        need = len(batch.seqs) * self.storage.layout.spec.num_heads * max_context
        if self._scores.numel() < need:
            self._scores = torch.empty(max(need, 2 * self._scores.numel()), dtype=torch.float32)
        return block_tables, context_lens, max_context

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        keys, values = self.storage.keys(layer_idx), self.storage.values(layer_idx)
        num_kv, d = k.shape[1], k.shape[2]
        # Write this step's K/V into their slots: [num_slots, num_kv, d] views of the store.
        keys.view(-1, num_kv, d).index_copy_(0, self.slot_mapping, k.to(keys.dtype))
        values.view(-1, num_kv, d).index_copy_(0, self.slot_mapping, v.to(values.dtype))
        if self._decode is not None and q.dtype == torch.float32:
            block_tables, context_lens, max_context = self._decode
            return cpu_kernels.paged_decode_attention(q, keys, values, block_tables,
                                                      context_lens, max_context, self._scores)
        return self._attend_gathered(q, keys, values)

    def _attend_gathered(self, q: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for s, index in zip(self.batch.seqs, self._gather_index):
            rows = slice(s.row_start, s.row_start + s.num_new_tokens)
            # Only this sequence's blocks: [n_blocks * block_size, kv, d] -> [kv, L, d]
            k_seq = keys.index_select(0, index).flatten(0, 1)[:s.context_len].transpose(0, 1)
            v_seq = values.index_select(0, index).flatten(0, 1)[:s.context_len].transpose(0, 1)
            out[rows] = attention_sdpa(q[rows], k_seq.to(q.dtype), v_seq.to(q.dtype))
        return out

    def free(self, seq_id: str) -> None:
        """Blocks are returned by the BlockManager; only a swapped-out host copy is dropped."""
        self.storage.drop(seq_id)

    def num_bytes_allocated(self) -> int:
        return self.storage.num_bytes_allocated()
