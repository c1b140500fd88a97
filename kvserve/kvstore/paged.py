"""The paged K/V tensors, shaped by KVLayout: one store per layer, carved into blocks.

The store knows nothing of requests (block tables live in kvcache/block_manager.py); it allocates
once, at start-up, and is never grown. K and V each have a format (one, or two: "int8/int4") whose
codec (codecs.py) names its parts: float formats one, "kv"; a quantized format its codes and
scales. Every part is a tensor [num_layers, num_blocks, ...] (block index on dimension 1), so block
copies move every part of a block together; `parts` names them "k.codes", "v.scale", ...

A block codec (int8, int4) encodes whole blocks: the tokens of a sequence's last, partial block
wait in float32 in that sequence's residual slot (its residual window) and are encoded together,
with the new tokens that fill the block, the step it fills. Slots are handed out by sequence id
and given back when the sequence ends, is preempted or is swapped out (its window travels with
its blocks).
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
    """Where one step's tokens go in a block codec's store, the same for every layer. Sources
    are rows of cat(residual slots flattened [slots * block_size], the step's new tokens)."""

    fill_src: torch.Tensor  # [num_filled * block_size] long: the filled blocks' tokens in order
    fill_blocks: torch.Tensor  # [num_filled] long: the blocks they fill
    stage_dst: torch.Tensor  # [m] long: residual rows (slot * block_size + offset) ...
    stage_rows: torch.Tensor  # [m] long: ... receiving these new rows
    slots: tuple[int, ...]  # each sequence's residual slot, in the step's order


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
        # Zeroed so an unwritten slot can never feed NaN into a masked computation.
        self._parts: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros((s.num_layers, self.num_blocks, *shape), dtype=dtype,
                               device=device)
             for name, (shape, dtype) in c.block_parts(bs, s.num_kv_heads, s.head_dim).items()}
            for c in self.codecs]
        # fp8: one scale per layer for K and for V (not per block: outside the parts)
        self.tensor_scales = (torch.ones((s.num_layers, 2), dtype=torch.float32, device=device)
                              if any(c.per_tensor_scale for c in self.codecs) else None)
        # Residual windows of block codecs: [num_layers, slots, block_size, kv, d] float32 a side
        self.residual: list[torch.Tensor | None] = [
            None if c.per_token else
            torch.zeros((s.num_layers, residual_slots, *layout.block_shape), dtype=torch.float32,
                        device=device) for c in self.codecs]
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
        return self._parts[which][name][layer_idx]

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

    def plan_residual(self, seqs: list[SeqWrite], block_tables: torch.Tensor) -> ResidualPlan:
        """Where each new token goes: into the block it fills (encoded with the tokens already
        waiting in the residual window), or into the window. block_tables: [len(seqs),
        max_blocks], the step's tables; only the entries of blocks that fill are read."""
        bs = self.layout.block_size
        slots = [self.residual_slot(s.seq_id) for s in seqs]
        # new rows follow the flattened residual's rows
        base = next(r for r in self.residual if r is not None).shape[1] * bs
        fill_src, fill_at, stage_dst, stage_rows = [], ([], []), [], []
        for i, (s, slot) in enumerate(zip(seqs, slots)):
            end = s.start + s.num_new
            first = s.start // bs * bs  # the block the step starts in
            for b0 in range(first, end - end % bs, bs):  # blocks that fill in this step
                fill_at[0].append(i)
                fill_at[1].append(b0 // bs)
                fill_src += [slot * bs + p - b0 if p < s.start else
                             base + s.row_start + p - s.start for p in range(b0, b0 + bs)]
            for p in range(max(s.start, end - end % bs), end):  # the new partial block
                stage_dst.append(slot * bs + p % bs)
                stage_rows.append(s.row_start + p - s.start)

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=self.device)

        fill_blocks = block_tables[t(fill_at[0]), t(fill_at[1])].long()
        return ResidualPlan(t(fill_src), fill_blocks, t(stage_dst), t(stage_rows), tuple(slots))

    # -- writes and reads ---------------------------------------------------------------------

    def write(self, layer_idx: int, slot_mapping: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, residual: ResidualPlan | None = None) -> None:
        """Encode new tokens' K and V [n, num_kv, d]: a per-token format into their slots
        (slot = block * block_size + offset), a block format as `residual` plans."""
        for which, x in ((0, k), (1, v)):
            codec = self._codec(which)
            if codec.per_token:
                encoded = codec.encode(x, self.tensor_scale(layer_idx, which))
                for name, values in encoded.items():
                    t = self._parts[which][name][layer_idx]
                    t.view(-1, *t.shape[2:]).index_copy_(0, slot_mapping, values)
                continue
            if residual is None:
                raise RuntimeError("a block-quantized format needs the step's residual plan")
            self._write_blocks(layer_idx, which, codec, x, residual)

    def _write_blocks(self, layer_idx: int, which: int, codec: KVCodec, x: torch.Tensor,
                      plan: ResidualPlan) -> None:
        window = self.residual[which][layer_idx]  # [slots, block_size, kv, d]
        flat = window.view(-1, *window.shape[2:])
        if plan.fill_blocks.numel():
            src = torch.cat((flat, x.float()))
            blocks = src.index_select(0, plan.fill_src).view(-1, *window.shape[1:])
            for name, values in codec.encode_blocks(blocks).items():
                self._parts[which][name][layer_idx].index_copy_(0, plan.fill_blocks, values)
        if plan.stage_rows.numel():
            flat.index_copy_(0, plan.stage_dst, x.index_select(0, plan.stage_rows).float())

    def gather(self, layer_idx: int, block_ids: torch.Tensor, length: int,
               dtype: torch.dtype, residual_slot: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` tokens of these blocks, decoded: K and V [num_kv, length, d] (a
        block format's partial last block from the sequence's residual slot)."""
        out = []
        bs = self.layout.block_size
        for which in (0, 1):
            codec = self._codec(which)
            parts = self._parts[which]
            if codec.per_token:
                got = {name: t[layer_idx].index_select(0, block_ids).flatten(0, 1)[:length]
                       for name, t in parts.items()}
                x = codec.decode(got, dtype, self.tensor_scale(layer_idx, which))
            else:
                full, rem = divmod(length, bs)
                got = {name: t[layer_idx].index_select(0, block_ids[:full])
                       for name, t in parts.items()}
                x = codec.decode_blocks(got, dtype).flatten(0, 1)
                if rem:
                    tail = self.residual[which][layer_idx, residual_slot, :rem]
                    x = torch.cat((x, tail.to(dtype)))
            out.append(x.transpose(0, 1))
        return out[0], out[1]

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
