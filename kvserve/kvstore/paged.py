"""The paged K/V tensors, shaped by KVLayout: one store per layer, carved into blocks.

The store knows nothing of requests (block tables live in kvcache/block_manager.py); it allocates
once, at start-up, and is never grown. K and V each have a format (one, or two: "int8/int4") whose
codec (codecs.py) names its parts: float formats one, "kv"; a quantized format its codes and
scales. Every part is a tensor [num_layers, num_blocks, ...] (block index on dimension 1), so block
copies move every part of a block together; `parts` names them "k.codes", "v.scale", ...

A block codec (int8, int4) encodes whole blocks: the tokens of a sequence's last, partial block
wait in float32 in that sequence's residual slot and are encoded together, with the new tokens
that fill the block, the step it fills. A quantized side also keeps the sequence's most recent
whole blocks there (the layout's window_tokens), as KIVI does: the slot is a ring of
`window_blocks` blocks (block j of the sequence at ring block j % window_blocks), and the
sequence's own attention reads its last window_blocks blocks from it in float32, the older ones
from their codes. Codes are written as before (every full block has them), so a prefix hit or a
swap reads the same blocks. Slots are handed out by sequence id and given back when the sequence
ends, is preempted or is swapped out (its window travels with its blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.kvcache.layout import KVLayout
from kvserve.kvstore.codecs import FLOAT_KV_DTYPES, KVCodec, codec_for

TORCH_KV_DTYPES = FLOAT_KV_DTYPES  # the formats a dense (contiguous) store can hold
SIDES = ("k", "v")


@dataclass(frozen=True)
class SeqWrite:
    """One sequence's new tokens in a step: rows [row_start, row_start + num_new) of the batch
    are its positions [start, start + num_new)."""

    seq_id: str
    row_start: int
    num_new: int
    start: int


@dataclass(frozen=True)
class ResidualPlan:
    """Where one step's tokens go in a store with residual windows, the same for every layer.
    A residual row is slot * window_rows + (block % window_blocks) * block_size + offset."""

    fill_ring: torch.Tensor  # [r] long: residual rows a filling block takes from the window ...
    fill_src: torch.Tensor  # [num_filled * block_size] long: rows of cat(the step's new rows,
    # those), the filled blocks' tokens in order
    fill_blocks: torch.Tensor  # [num_filled] long: the blocks they fill (block codecs encode)
    stage_dst: torch.Tensor  # [m] long: residual rows ...
    stage_rows: torch.Tensor | None  # [m] long: ... receiving these new rows (the tokens in
    # the sequence's window after the step); None: every new row, in order (a decode step)
    slots: tuple[int, ...]  # each sequence's residual slot, in the step's order


def window_rows(num_tokens: int, block_size: int, window_blocks: int) -> int:
    """The first position a sequence of num_tokens reads from its residual window (its last
    window_blocks blocks): a multiple of block_size."""
    return max(0, -(-num_tokens // block_size) - window_blocks) * block_size


class PagedKVStore:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device,
                 residual_slots: int = 1):
        self.layout = layout
        self.num_blocks = num_blocks
        k_fmt, v_fmt = layout.k_format.name, layout.v_format.name
        # K's and V's codecs (a lab's experiment may swap in others: use_codecs)
        self.codecs: list[KVCodec] = [codec_for(k_fmt, 0), codec_for(v_fmt, 1)]
        # the float dtype K/V are stored in (both sides one float format), else None
        self.dtype = FLOAT_KV_DTYPES.get(k_fmt) if k_fmt == v_fmt else None
        self.device = device
        self._allocate(residual_slots)

    def _allocate(self, residual_slots: int) -> None:
        s, layout, device = self.layout.spec, self.layout, self.device
        bs = layout.block_size
        # A block holds page_layers layers (every layer, or one group's: kvcache/groups.py);
        # layer l's K/V are in row _row[l]. Zeroed so an unwritten slot can never feed NaN into
        # a masked computation.
        self._row = layout.kv_groups.row_of_layer
        self._parts: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros((layout.page_layers, self.num_blocks, *shape), dtype=dtype,
                               device=device)
             for name, (shape, dtype) in c.block_parts(bs, s.num_kv_heads, s.head_dim).items()}
            for c in self.codecs]
        # fp8: one scale per layer for K and for V (not per block: outside the parts)
        self.tensor_scales = (torch.ones((s.num_layers, 2), dtype=torch.float32, device=device)
                              if any(c.per_tensor_scale for c in self.codecs) else None)
        # Residual windows, a ring of window_blocks blocks per slot: [num_layers, slots,
        # window_blocks * block_size, kv, d] float32 for each side that has one
        self.window_blocks = max(layout.window_blocks)
        rows = self.window_blocks * bs
        self.residual: list[torch.Tensor | None] = [
            None if not w else
            torch.zeros((s.num_layers, residual_slots, rows, s.num_kv_heads, s.head_dim),
                        dtype=torch.float32, device=device) for w in layout.window_blocks]
        self._slot_of: dict[str, int] = {}
        self._free_slots = list(range(residual_slots))

    def use_codecs(self, k_codec: KVCodec, v_codec: KVCodec) -> None:
        """Store K and V with these codecs instead (a lab's experiment: another scale
        granularity), the parts allocated afresh for them; the pool must be unused."""
        self.codecs = [k_codec, v_codec]
        self.dtype = None
        self._allocate(max(1, len(self._free_slots) + len(self._slot_of)))

    @property
    def codec(self) -> KVCodec:
        """K's codec (V's too unless the formats differ)."""
        return self.codecs[0]

    @property
    def quantized(self) -> bool:
        return any(c.quantized for c in self.codecs)

    @property
    def has_residual(self) -> bool:
        return any(r is not None for r in self.residual)

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        """Every per-block tensor of the store by name ("k.codes", ...), block index on dim 1."""
        return {f"{side}.{name}": t for side, parts in zip(SIDES, self._parts)
                for name, t in parts.items()}

    def num_bytes_allocated(self) -> int:
        tensors = list(self.parts.values()) + [r for r in self.residual if r is not None]
        if self.tensor_scales is not None:
            tensors.append(self.tensor_scales)
        return sum(t.numel() * t.element_size() for t in tensors)

    def part(self, name: str, layer_idx: int, which: int) -> torch.Tensor:
        """One part of one layer's K (which=0) or V (1): [num_blocks, ...]."""
        return self._parts[which][name][self._row[layer_idx]]

    def float_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every layer, [num_layers, num_blocks, block_size, num_kv, d] each (a
        float format: the tensors the per-layer keys()/values() are views of)."""
        return self._parts[0]["kv"], self._parts[1]["kv"]

    def keys(self, layer_idx: int) -> torch.Tensor:
        return self.part("kv", layer_idx, 0)  # [num_blocks, block_size, num_kv_heads, head_dim]

    def values(self, layer_idx: int) -> torch.Tensor:
        return self.part("kv", layer_idx, 1)

    def tensor_scale(self, layer_idx: int, which: int) -> torch.Tensor | None:
        return None if self.tensor_scales is None else self.tensor_scales[layer_idx, which]

    def _codec(self, which: int) -> KVCodec:
        return self.codecs[which]

    # -- residual windows (block codecs) ------------------------------------------------------

    def residual_slot(self, seq_id: str) -> int:
        """The sequence's residual slot, handed out on first use."""
        slot = self._slot_of.get(seq_id)
        if slot is None:
            if not self._free_slots:
                self._grow_residual()
            slot = self._slot_of[seq_id] = self._free_slots.pop()
        return slot

    def _grow_residual(self) -> None:
        """More sequences hold a window than the layout priced (residual_seqs): double."""
        n = next(r for r in self.residual if r is not None).shape[1]
        self.residual = [None if r is None else torch.cat((r, torch.zeros_like(r)), dim=1)
                         for r in self.residual]
        self._free_slots.extend(range(2 * n - 1, n - 1, -1))

    def release_residual(self, seq_id: str) -> None:
        slot = self._slot_of.pop(seq_id, None)
        if slot is not None:
            self._free_slots.append(slot)

    def take_residual(self, seq_id: str) -> list[torch.Tensor | None] | None:
        """A host copy of the sequence's residual window (it is swapped out), its slot freed."""
        slot = self._slot_of.get(seq_id)
        if slot is None:
            return None
        out = [None if r is None else r[:, slot].to("cpu", copy=True) for r in self.residual]
        self.release_residual(seq_id)
        return out

    def put_residual(self, seq_id: str, window: list[torch.Tensor | None]) -> None:
        slot = self.residual_slot(seq_id)
        for r, w in zip(self.residual, window):
            if r is not None:
                r[:, slot].copy_(w)

    def ring_row(self, slot: int, position: int) -> int:
        """The residual row of a sequence's token at `position` (in its slot's ring)."""
        bs, w = self.layout.block_size, self.window_blocks
        return (slot * w + position // bs % w) * bs + position % bs

    def _seed_window(self, slot: int, table: torch.Tensor, start: int) -> None:
        """A sequence that starts computing at `start` (its earlier blocks a prefix hit): its
        window's rows before `start` are what the hit blocks' codes decode to (their float K/V
        were the first computer's, not kept)."""
        bs = self.layout.block_size
        lo = window_rows(start + 1, bs, self.window_blocks)
        if lo >= start:
            return
        if start % bs:
            raise RuntimeError(f"a window seeded from codes must start at a block boundary, "
                               f"not {start}")
        rows = self.ring_rows(slot, lo, start)
        blocks = table[lo // bs:start // bs].long()
        for which, window in enumerate(self.residual):
            if window is None:
                continue
            for layer_idx in range(window.shape[0]):
                x = self._decode(layer_idx, which, blocks, start - lo, torch.float32)
                window[layer_idx].view(-1, *window.shape[3:]).index_copy_(0, rows, x)

    def plan_residual(self, seqs: list[SeqWrite], block_tables: torch.Tensor) -> ResidualPlan:
        """Where each new token goes: into the block it fills (a block codec encodes it with the
        tokens already waiting in the window), and into the window when it is among the
        sequence's last window_blocks blocks after the step. block_tables: [len(seqs),
        max_blocks], the step's tables; only the entries of blocks that fill are read."""
        bs, w = self.layout.block_size, self.window_blocks
        slots = []
        for i, s in enumerate(seqs):
            fresh = s.seq_id not in self._slot_of
            slots.append(self.residual_slot(s.seq_id))
            if fresh and s.start:  # after a prefix hit: the window's blocks before it
                self._seed_window(slots[-1], block_tables[i], s.start)
        base = max((s.row_start + s.num_new for s in seqs), default=0)  # the step's new rows
        fill_ring, fill_src, fill_at, stage_dst, stage_rows = [], [], ([], []), [], []
        for i, (s, slot) in enumerate(zip(seqs, slots)):
            end = s.start + s.num_new
            first = s.start // bs * bs  # the block the step starts in
            for b0 in range(first, end - end % bs, bs):  # blocks that fill in this step
                fill_at[0].append(i)
                fill_at[1].append(b0 // bs)
                for p in range(b0, b0 + bs):
                    if p < s.start:  # waiting in the window (the step's first block)
                        fill_src.append(base + len(fill_ring))
                        fill_ring.append(self.ring_row(slot, p))
                    else:
                        fill_src.append(s.row_start + p - s.start)
            for p in range(max(s.start, window_rows(end, bs, w)), end):
                stage_dst.append(self.ring_row(slot, p))
                stage_rows.append(s.row_start + p - s.start)

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=self.device)

        fill_blocks = block_tables[t(fill_at[0]), t(fill_at[1])].long()
        every = stage_rows == list(range(base))  # no index_select per layer and side
        return ResidualPlan(t(fill_ring), t(fill_src), fill_blocks, t(stage_dst),
                            None if every else t(stage_rows), tuple(slots))

    # -- writes and reads ---------------------------------------------------------------------

    def write(self, layer_idx: int, slot_mapping: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, residual: ResidualPlan | None = None) -> None:
        """Encode new tokens' K and V [n, num_kv, d]: a per-token format without a window into
        their slots (slot = block * block_size + offset); a side with a window (any quantized
        format) as `residual` plans."""
        for which, x in ((0, k), (1, v)):
            codec = self._codec(which)
            if codec.per_token and self.residual[which] is None:
                encoded = codec.encode(x, self.tensor_scale(layer_idx, which))
                for name, values in encoded.items():
                    t = self._parts[which][name][self._row[layer_idx]]
                    t.view(-1, *t.shape[2:]).index_copy_(0, slot_mapping, values)
            if self.residual[which] is None:
                continue
            if residual is None:
                raise RuntimeError("a store with residual windows needs the step's plan")
            self._write_window(layer_idx, which, codec, x, residual)

    def _write_window(self, layer_idx: int, which: int, codec: KVCodec, x: torch.Tensor,
                      plan: ResidualPlan) -> None:
        """The blocks that fill are encoded whole (a per-token format too: its codes are read
        only once a block has left the window, so they are written once, when it fills, not
        token by token); then the window takes its new rows."""
        window = self.residual[which][layer_idx]  # [slots, window rows, kv, d]
        flat = window.view(-1, *window.shape[2:])
        if plan.fill_blocks.numel():
            src = torch.cat((x.float(), flat.index_select(0, plan.fill_ring)))
            blocks = src.index_select(0, plan.fill_src).view(-1, self.layout.block_size,
                                                              *window.shape[2:])
            encoded = (codec.encode(blocks, self.tensor_scale(layer_idx, which))
                       if codec.per_token else codec.encode_blocks(blocks))
            for name, values in encoded.items():
                self._parts[which][name][self._row[layer_idx]].index_copy_(0, plan.fill_blocks,
                                                                           values)
        if plan.stage_rows is None:
            flat.index_copy_(0, plan.stage_dst, x.float())
        elif plan.stage_rows.numel():
            flat.index_copy_(0, plan.stage_dst, x.index_select(0, plan.stage_rows).float())

    def _decode(self, layer_idx: int, which: int, block_ids: torch.Tensor, length: int,
                dtype: torch.dtype) -> torch.Tensor:
        """The first `length` tokens of these blocks as their codes decode, [length, kv, d]
        (a block codec: whole blocks only)."""
        codec, parts = self._codec(which), self._parts[which]
        if codec.per_token:
            got = {name: t[self._row[layer_idx]].index_select(0, block_ids).flatten(0, 1)[:length]
                   for name, t in parts.items()}
            return codec.decode(got, dtype, self.tensor_scale(layer_idx, which))
        got = {name: t[self._row[layer_idx]].index_select(
            0, block_ids[:length // self.layout.block_size])
               for name, t in parts.items()}
        return codec.decode_blocks(got, dtype).flatten(0, 1)

    def ring_rows(self, slot: int, lo: int, hi: int) -> torch.Tensor:
        """The residual rows of a sequence's positions [lo, hi) (long, on the device): ring_row
        of each."""
        bs, w = self.layout.block_size, self.window_blocks
        p = torch.arange(lo, hi, dtype=torch.long, device=self.device)
        return (slot * w + p // bs % w) * bs + p % bs

    def read_window(self, layer_idx: int, which: int, rows: torch.Tensor) -> torch.Tensor:
        """These residual rows of one layer's K (which=0) or V (1): [len(rows), kv, d]."""
        window = self.residual[which][layer_idx]
        return window.view(-1, *window.shape[2:]).index_select(0, rows)

    def gather(self, layer_idx: int, block_ids: torch.Tensor, length: int,
               dtype: torch.dtype, residual_slot: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` tokens of these blocks as a query at position length - 1 reads
        them: K and V [num_kv, length, d] (a side with residual windows reads the sequence's
        last window_blocks blocks from its slot, in float32)."""
        out = []
        bs = self.layout.block_size
        for which in (0, 1):
            window = self.residual[which]
            coded = length if window is None else window_rows(length, bs, self.window_blocks)
            x = self._decode(layer_idx, which, block_ids, coded, dtype)
            if coded < length:
                rows = self.ring_rows(residual_slot, coded, length)
                x = torch.cat((x, self.read_window(layer_idx, which, rows).to(dtype)))
            out.append(x.transpose(0, 1))
        return out[0], out[1]

    def gather_windowed(self, layer_idx: int, block_ids: torch.Tensor, start: int, length: int,
                        dtype: torch.dtype, before: list[torch.Tensor | None],
                        new: tuple[torch.Tensor, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """For queries at positions [start, length) of a store with windows: K and V as their
        codes decode them, [num_kv, window_rows(length), d] from position 0, and as the window
        holds them, [num_kv, length - w0, d] from w0 = window_rows(start + 1) (attention_windowed
        picks one of the two for each query and key). before[which]: the window's rows of
        [w0, start), read before this step's write; new: the step's own K and V [length - start,
        kv, d]. A side without a window (a float side of a pair) is read whole into both."""
        bs, wb = self.layout.block_size, self.window_blocks
        w0, wn = window_rows(start + 1, bs, wb), window_rows(length, bs, wb)
        out = []
        for which in (0, 1):
            if self.residual[which] is None:
                x = self._decode(layer_idx, which, block_ids, length, dtype)
                out.append((x[:wn], x[w0:]))
                continue
            coded = self._decode(layer_idx, which, block_ids, wn, dtype)
            held = torch.cat((before[which].to(dtype), new[which].to(dtype)))
            out.append((coded, held))
        (kc, kw), (vc, vw) = out
        return (kc.transpose(0, 1), vc.transpose(0, 1), kw.transpose(0, 1), vw.transpose(0, 1),
                w0)

    def read_blocks(self, block_ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Copies of these blocks on the host (pinned when the store is on CUDA), by part:
        each [num_layers, len(block_ids), ...]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        out = {}
        for name, t in self.parts.items():
            blocks = t.index_select(1, index)
            host = torch.empty(blocks.shape, dtype=blocks.dtype, device="cpu",
                               pin_memory=t.is_cuda)
            host.copy_(blocks)
            out[name] = host
        return out

    def write_blocks(self, block_ids: tuple[int, ...], parts: dict[str, torch.Tensor]) -> None:
        """Write host copies (as read_blocks returns them) into these device blocks."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for name, t in self.parts.items():
            t.index_copy_(1, index, parts[name].to(self.device, non_blocking=True))
