"""The paged attention backend: K/V live in fixed-size blocks that each sequence's table points to.

Every step writes the new tokens' K/V into their slots (the metadata's slot mapping), then attends:
the sequences that feed one token (all of a decode step, the decode part of a mixed one) go through
one C call that reads blocks where they lie (kernels/gemv.c) when on CPU; the rest (prefill,
chunked prefill over cached blocks, anything on CUDA) gathers only the blocks each sequence uses
and runs the PyTorch attention, which is also the reference the C path is
tested against. Which blocks a sequence owns is the block manager's call; the tables arrive in
the step's metadata. A block-quantized format (int8, int4) keeps each sequence's partial block in
its residual window (kvstore/paged.py): prepare() plans the step's writes once for every layer.
"""

from __future__ import annotations

import torch

from kvserve.kernels import cpu as cpu_kernels
from kvserve.kvstore.paged import PagedKVStore, ResidualPlan, SeqWrite
from kvserve.model.attention.metadata import AttentionMetadata, DecodeRows
from kvserve.model.attention.ops import attention_sdpa

_CODECS = "kvserve.kvstore.codecs"  # a test's own codec subclass takes the PyTorch path
# formats the C decode kernel reads where they lie (float32 or bfloat16 K/V, or codes), when K
# and V share one (or are int8 and int4)
FAST_FORMATS = ("float32", "bfloat16", "int8", "fp8_e4m3", "fp8_e5m2", "int4")


class PagedAttention:
    retains_kv = True
    use_fast_decode = True  # tests switch the C decode attention off to compare with PyTorch

    def __init__(self, store: PagedKVStore):
        self.store = store
        self._scores = torch.empty(0, dtype=torch.float32)  # workspace of the C decode kernel
        self._residual: ResidualPlan | None = None  # this step's plan (block formats)
        self._decode_slots: torch.Tensor | None = None  # residual slots of the decode rows
        self._fast = False  # this step's decodes take the C kernel (_fast_ok, once a step)

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.paged is None:
            raise RuntimeError("a paged step needs block tables and a slot mapping")
        if self.store.has_residual:
            self._residual = self.store.plan_residual(
                [SeqWrite(s.seq_id, s.row_start, s.num_new_tokens, s.start_position)
                 for s in meta.seqs], meta.paged.block_tables)
            self._decode_slots = torch.tensor(
                [slot for s, slot in zip(meta.seqs, self._residual.slots)
                 if s.num_new_tokens == 1], dtype=torch.long)
        decode = meta.paged.decode
        self._fast = self._fast_ok()
        if decode is not None and self._fast:
            need = (decode.context_lens.numel() * self.store.layout.spec.num_heads
                    * decode.max_context_len)
            if self._scores.numel() < need:
                self._scores = torch.empty(max(need, 2 * self._scores.numel()),
                                           dtype=torch.float32)

    def _fast_ok(self) -> bool:
        st = self.store
        k_codec, v_codec = st.codecs
        spec, bs = st.layout.spec, st.layout.block_size
        block_kernel_fits = k_codec.per_token or (  # the int8/int4 kernel's stack buffers
            spec.head_dim <= cpu_kernels.I4_MAX_HEAD_DIM
            and spec.num_heads // spec.num_kv_heads <= cpu_kernels.I4_MAX_GROUP
            and bs * spec.head_dim <= cpu_kernels.I4_MAX_BLOCK_ELEMS)
        same = k_codec.name == v_codec.name and k_codec.name in FAST_FORMATS
        both_block = not (k_codec.per_token or v_codec.per_token)  # int8, int4
        return (self.use_fast_decode and st.device.type == "cpu"
                and type(k_codec).__module__ == type(v_codec).__module__ == _CODECS
                and (same or both_block) and block_kernel_fits and cpu_kernels.available())

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # Write this step's K/V into their slots, in the store's format (quantized on write).
        self.store.write(layer_idx, meta.paged.slot_mapping, k, v, self._residual)
        decode = meta.paged.decode
        if decode is None or q.dtype != torch.float32 or not self._fast:
            return self._attend_gathered(q, layer_idx, meta, out=None, skip_decode=False)
        if decode.rows is None:  # a decode step: one C call for the whole batch
            return self._decode(q, layer_idx, decode)
        # A mixed step: the decodes still take the C kernel; only the prefills gather.
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        out.index_copy_(0, decode.rows,
                        self._decode(q.index_select(0, decode.rows), layer_idx, decode))
        return self._attend_gathered(q, layer_idx, meta, out=out, skip_decode=True)

    def _decode(self, q: torch.Tensor, layer_idx: int, decode: DecodeRows) -> torch.Tensor:
        st = self.store
        if st.dtype is not None:  # a float format
            return cpu_kernels.paged_decode_attention(
                q, st.keys(layer_idx), st.values(layer_idx), decode.block_tables,
                decode.context_lens, decode.max_context_len, self._scores)
        if not st.codec.per_token:  # int8, int4 (K and V each): codes and residual windows
            parts = [{name: st.part(name, layer_idx, which) for name in ("codes", "scale", "zero")}
                     for which in (0, 1)]
            return cpu_kernels.paged_decode_attention_affine(
                (st.codecs[0].bits, st.codecs[1].bits), q, parts[0], parts[1],
                st.residual[0][layer_idx], st.residual[1][layer_idx], self._decode_slots,
                decode.block_tables, decode.context_lens, decode.max_context_len, self._scores)
        k_scale, v_scale = st.tensor_scale(layer_idx, 0), st.tensor_scale(layer_idx, 1)
        return cpu_kernels.paged_decode_attention_codes(
            st.codec.name, q, st.part("codes", layer_idx, 0), st.part("codes", layer_idx, 1),
            1.0 if k_scale is None else float(k_scale), 1.0 if v_scale is None else float(v_scale),
            decode.block_tables, decode.context_lens, decode.max_context_len, self._scores)

    def _attend_gathered(self, q: torch.Tensor, layer_idx: int, meta: AttentionMetadata,
                         out: torch.Tensor | None, skip_decode: bool) -> torch.Tensor:
        """The PyTorch path (the reference of the C kernel): each sequence's blocks gathered and
        decoded; skip_decode leaves the one-token sequences' rows of `out` as they are."""
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        paged = meta.paged
        for i, s in enumerate(meta.seqs):
            if skip_decode and s.num_new_tokens == 1:
                continue
            rows = slice(s.row_start, s.row_start + s.num_new_tokens)
            index = paged.block_tables[i, :paged.num_blocks[i]]
            # Only this sequence's blocks, decoded: [kv, context_len, d] each
            slot = None if self._residual is None else self._residual.slots[i]
            k_seq, v_seq = self.store.gather(layer_idx, index, s.context_len, q.dtype, slot)
            out[rows] = attention_sdpa(q[rows], k_seq, v_seq)
        return out

    def release(self, seq_id: str) -> None:
        """Blocks are returned by the block manager; a sequence's residual window (block
        formats) is given back here."""
        self.store.release_residual(seq_id)

    def num_bytes_allocated(self) -> int:
        return self.store.num_bytes_allocated()
