"""The paged attention backend: K/V live in fixed-size blocks that each sequence's table points to.

Every step writes the new tokens' K/V into their slots (the metadata's slot mapping), then attends:
the sequences that feed one token (all of a decode step, the decode part of a mixed one) go through
one C call that reads blocks where they lie (kernels/gemv.c) when on CPU; the rest (prefill,
chunked prefill over cached blocks, anything on CUDA) gathers only the blocks each sequence uses
and runs the PyTorch attention, which is also the reference the C path is
tested against. Which blocks a sequence owns is the block manager's call; the tables arrive in
the step's metadata. A quantized format keeps each sequence's last blocks (int8/int4: the partial
one at least) in float32 in its residual window (kvstore/paged.py), read there by the sequence's
own attention: prepare() plans the step's writes once for every layer.
"""

from __future__ import annotations

import dataclasses

import torch

from kvserve.kernels import cpu as cpu_kernels
from kvserve.kvcache.policy import FullHistory, RetentionPolicy, Sinks
from kvserve.kvstore.paged import PagedKVStore, ResidualPlan, SeqWrite, window_rows
from kvserve.model.attention.metadata import AttentionMetadata, DecodeRows
from kvserve.model.attention.ops import attention_sdpa, attention_windowed
from kvserve.model.layers import rope_inv_freq, rope_shift

_CODECS = "kvserve.kvstore.codecs"  # a test's own codec subclass takes the PyTorch path
# formats the C decode kernel reads where they lie (float32 or bfloat16 K/V, or codes), when K
# and V share one (or are int8 and int4)
FAST_FORMATS = ("float32", "bfloat16", "int8", "fp8_e4m3", "fp8_e5m2", "int4")


class PagedAttention:
    retains_kv = True
    use_fast_decode = True  # tests switch the C decode attention off to compare with PyTorch

    def __init__(self, store: PagedKVStore, policy: RetentionPolicy | None = None):
        self.store = store
        # Under attention sinks, each sequence reads its sink blocks, rotated to sit just before
        # its window (rope_shift), and its window's blocks: the C kernels do not, PyTorch does.
        self.policy = policy or FullHistory()
        self._sinks = isinstance(self.policy, Sinks)
        spec = store.layout.spec
        # each layer's KV group: the step's tables for it are meta.paged_of(group)
        self._group = store.layout.kv_groups.group_of_layer
        self._inv_freq = rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)
        self._scores = torch.empty(0, dtype=torch.float32)  # workspace of the C decode kernel
        self._residual: ResidualPlan | None = None  # this step's plan (block formats)
        self._decode_slots: torch.Tensor | None = None  # residual slots of the decode rows
        # each sequence's residual rows of its window before its new tokens (None: no windows;
        # an entry None until the PyTorch path needs it, built once a step in forward)
        self._before_rows: list[torch.Tensor | None] | None = None
        self._fast = False  # this step's decodes take the C kernel (_fast_ok, once a step)

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.paged is None:
            raise RuntimeError("a paged step needs block tables and a slot mapping")
        self._fast = self._fast_ok()
        st = self.store
        if st.has_residual:
            self._residual = st.plan_residual(
                [SeqWrite(s.seq_id, s.row_start, s.num_new_tokens, s.start_position)
                 for s in meta.seqs], meta.paged.block_tables)
            self._decode_slots = torch.tensor(
                [slot for s, slot in zip(meta.seqs, self._residual.slots)
                 if s.num_new_tokens == 1], dtype=torch.long)
            self._before_rows = [None] * len(meta.seqs)
        decode = meta.paged.decode
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
            and bs * spec.head_dim <= cpu_kernels.I4_MAX_BLOCK_ELEMS
            and bs <= cpu_kernels.I4_MAX_BLOCK_TOKENS)
        same = k_codec.name == v_codec.name and k_codec.name in FAST_FORMATS
        both_block = not (k_codec.per_token or v_codec.per_token)  # int8, int4
        return (self.use_fast_decode and st.device.type == "cpu" and not self._sinks
                and spec.plain_attention
                and type(k_codec).__module__ == type(v_codec).__module__ == _CODECS
                and (same or both_block) and block_kernel_fits and cpu_kernels.available())

    def fused_decode(self, meta: AttentionMetadata) -> cpu_kernels.PagedDecode | None:
        """A decode step's K/V store and tables for a model that runs all its layers in one C
        call (kernels/cpu.py decode_layers_), writing and attending as forward() would; None
        when this step needs forward() per layer (prefill or mixed rows, a quantized format,
        residual windows, CUDA). Call after prepare()."""
        st, decode = self.store, meta.paged.decode
        if (not self._fast or decode is None or decode.rows is not None or meta.paged_groups
                or not self._store_fuses()):
            return None
        keys, values = st.float_kv()
        return cpu_kernels.PagedDecode(
            keys, values, meta.paged.slot_mapping,
            decode.block_tables, decode.context_lens, decode.max_context_len, self._scores)

    fused_decode_enabled = True  # tests switch it off to compare with the per-layer calls

    def _store_fuses(self) -> bool:
        """What fused_decode needs of the store whatever the step: float K/V, no residual
        windows, no sliding-window layers, and the fused path switched on."""
        st = self.store
        return (st.dtype is not None and not st.has_residual and self.fused_decode_enabled
                and not st.layout.spec.has_windows)

    def fuses_decode_steps(self) -> bool:
        return (self._fast_ok() and self._store_fuses()
                and self.store.layout.kv_groups.num_groups == 1
                and isinstance(self.policy, FullHistory))

    def fused_decode_steps(self, meta: AttentionMetadata,
                           num_steps: int) -> cpu_kernels.PagedDecode | None:
        step = self.fused_decode(meta)  # the runner checked the tables cover every step
        if step is None:
            return None
        need = step.context_lens.numel() * self.store.layout.spec.num_heads * \
            (step.max_context + num_steps - 1)
        if self._scores.numel() < need:
            self._scores = torch.empty(need, dtype=torch.float32)
        return dataclasses.replace(step, scores=self._scores)

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        st = self.store
        paged = meta.paged_of(self._group[layer_idx])
        decode = paged.decode
        gather_all = (decode is None or q.dtype != torch.float32 or not self._fast
                      or st.layout.spec.window(layer_idx) is not None)
        before = None  # the gathered sequences' window rows, as they were before this step
        if self._before_rows is not None:
            before = [None if not gather_all and s.num_new_tokens == 1 else
                      [None if w is None else st.read_window(layer_idx, which,
                                                             self._rows_before(i, s))
                       for which, w in enumerate(st.residual)]
                      for i, s in enumerate(meta.seqs)]
        # Write this step's K/V into their slots, in the store's format (quantized on write).
        st.write(layer_idx, paged.slot_mapping, k, v, self._residual)
        new = (k, v, before)
        if gather_all:
            return self._attend_gathered(q, layer_idx, meta, None, False, new)
        if decode.rows is None:  # a decode step: one C call for the whole batch
            return self._decode(q, layer_idx, decode)
        # A mixed step: the decodes still take the C kernel; only the prefills gather.
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        out.index_copy_(0, decode.rows,
                        self._decode(q.index_select(0, decode.rows), layer_idx, decode))
        return self._attend_gathered(q, layer_idx, meta, out, True, new)

    def _rows_before(self, i: int, s) -> torch.Tensor:
        """Sequence i's residual rows of [its first query's window start, its first new
        position): what the PyTorch path reads from the window besides the new rows."""
        rows = self._before_rows[i]
        if rows is None:
            st = self.store
            lo = window_rows(s.start_position + 1, st.layout.block_size, st.window_blocks)
            rows = self._before_rows[i] = st.ring_rows(self._residual.slots[i], lo,
                                                       s.start_position)
        return rows

    def _decode(self, q: torch.Tensor, layer_idx: int, decode: DecodeRows) -> torch.Tensor:
        st = self.store
        if st.dtype is not None:  # a float format
            return cpu_kernels.paged_decode_attention(
                q, st.keys(layer_idx), st.values(layer_idx), decode.block_tables,
                decode.context_lens, decode.max_context_len, self._scores)
        window = None if not st.has_residual else cpu_kernels.Window(
            st.residual[0][layer_idx], st.residual[1][layer_idx], self._decode_slots,
            st.window_blocks)
        if not st.codec.per_token:  # int8, int4 (K and V each): codes and residual windows
            parts = [{name: st.part(name, layer_idx, which) for name in ("codes", "scale", "zero")}
                     for which in (0, 1)]
            return cpu_kernels.paged_decode_attention_affine(
                (st.codecs[0].bits, st.codecs[1].bits), q, parts[0], parts[1], window,
                decode.block_tables, decode.context_lens, decode.max_context_len, self._scores)
        k_scale, v_scale = st.tensor_scale(layer_idx, 0), st.tensor_scale(layer_idx, 1)
        return cpu_kernels.paged_decode_attention_codes(
            st.codec.name, q, st.part("codes", layer_idx, 0), st.part("codes", layer_idx, 1),
            1.0 if k_scale is None else float(k_scale), 1.0 if v_scale is None else float(v_scale),
            window, decode.block_tables, decode.context_lens, decode.max_context_len,
            self._scores)

    def _attend_gathered(self, q: torch.Tensor, layer_idx: int, meta: AttentionMetadata,
                         out: torch.Tensor | None, skip_decode: bool, new: tuple) -> torch.Tensor:
        """The PyTorch path (the reference of the C kernel): each sequence's blocks gathered and
        decoded; skip_decode leaves the one-token sequences' rows of `out` as they are. With
        residual windows, each query reads its own window's keys in float32 and the older ones
        through their codes (attention_windowed), as a decode at its position would: the
        result does not depend on how a prompt was split into chunks. new: the step's K, V and
        the windows' rows before it (forward)."""
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        paged, st = meta.paged_of(self._group[layer_idx]), self.store
        k, v, before = new
        spec = st.layout.spec
        window = spec.window(layer_idx)
        for i, s in enumerate(meta.seqs):
            if skip_decode and s.num_new_tokens == 1:
                continue
            rows = slice(s.row_start, s.row_start + s.num_new_tokens)
            index = paged.block_tables[i, :paged.num_blocks[i]]
            gone = self.policy.released_blocks(s.start_position, st.layout.block_size)
            if self._sinks and gone:  # the sink blocks, then the window's
                out[rows] = self._attend_sinks(q[rows], layer_idx, index, s.context_len, gone)
                continue
            if before is None:  # no windows: this sequence's blocks, [kv, context_len, d] each
                # a sliding window: from the block of the first query's first key on (blocks
                # before it may be released)
                first = 0 if window is None else \
                    max(0, s.start_position - window + 1) // st.layout.block_size
                k_seq, v_seq = st.gather(layer_idx, index[first:],
                                         s.context_len - first * st.layout.block_size, q.dtype)
                out[rows] = attention_sdpa(q[rows], k_seq, v_seq, window, spec.attn_scale,
                                           spec.attn_softcap)
                continue
            kc, vc, kw, vw, w0 = st.gather_windowed(layer_idx, index, s.start_position,
                                                    s.context_len, q.dtype, before[i],
                                                    (k[rows], v[rows]))
            out[rows] = attention_windowed(q[rows], kc, vc, kw, vw, w0, st.layout.block_size,
                                           st.window_blocks, window, spec.attn_scale,
                                           spec.attn_softcap)
        return out

    def _attend_sinks(self, q: torch.Tensor, layer_idx: int, index: torch.Tensor,
                      context_len: int, gone: range) -> torch.Tensor:
        """StreamingLLM over a sequence whose blocks `gone` are released: its queries read the
        sink blocks and the window's blocks as one cache, the sinks' keys rotated forward by
        the released tokens so that every query-key distance is the distance within that cache
        (RoPE scores depend on distances only): as if the window's tokens had the positions
        right after the sinks. Every kept key is visible to every query (causally)."""
        bs = self.store.layout.block_size
        kept = torch.cat((index[:gone.start], index[gone.stop:]))
        k, v = self.store.gather(layer_idx, kept, context_len - len(gone) * bs, q.dtype)
        sink = gone.start * bs
        k[:, :sink] = rope_shift(k[:, :sink], len(gone) * bs, self._inv_freq)
        spec = self.store.layout.spec
        return attention_sdpa(q, k, v, None, spec.attn_scale, spec.attn_softcap)

    def release(self, seq_id: str) -> None:
        """Blocks are returned by the block manager; a sequence's residual window (block
        formats) is given back here."""
        self.store.release_residual(seq_id)

    def num_bytes_allocated(self) -> int:
        return self.store.num_bytes_allocated()
