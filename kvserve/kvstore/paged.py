"""The paged K/V tensors, shaped by KVLayout: one store per layer, carved into blocks.

The store knows nothing of requests (block tables live in kvcache/block_manager.py); it allocates
once, at start-up, and is never grown. Its tensors are named parts of one layout format (float
formats have one, "kv"; a quantized format adds its codes and scales), each with the block index
on dimension 2, so block copies move every part of a block together. The codec (codecs.py) turns
K/V into a format's parts on write and back on read.
"""

from __future__ import annotations

import torch

from kvserve.kvcache.layout import KVLayout
from kvserve.kvstore.codecs import FLOAT_KV_DTYPES, KVCodec, codec_for

TORCH_KV_DTYPES = FLOAT_KV_DTYPES  # the formats a dense (contiguous) store can hold


class PagedKVStore:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device):
        self.layout = layout
        self.num_blocks = num_blocks
        self.codec: KVCodec = codec_for(layout.format.name)
        # V's codec when it is not K's (an experiment with the same parts: the quant lab's
        # alternatives); None: the one codec for both
        self.v_codec: KVCodec | None = None
        # the float dtype K/V are stored in, or None for a quantized format
        self.dtype = FLOAT_KV_DTYPES.get(layout.format.name)
        self.device = device
        s = layout.spec
        # Each part: [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, ...]; zeroed so
        # an unwritten slot can never feed NaN into a masked computation.
        self._parts = {
            name: torch.zeros((s.num_layers, 2, num_blocks, *layout.block_shape[:2], *p.tail),
                              dtype=p.dtype, device=device)
            for name, p in self.codec.parts(s.head_dim).items()}
        # fp8: one scale per layer for K and for V (not per block: outside `parts`)
        self.tensor_scales = (torch.ones((s.num_layers, 2), dtype=torch.float32, device=device)
                              if self.codec.per_tensor_scale else None)

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        """Every per-block tensor of the store by name, block index on dimension 2."""
        return self._parts

    @property
    def kv(self) -> torch.Tensor:
        """The one tensor of a float format: [num_layers, 2, num_blocks, block_size, kv, d]."""
        if "kv" not in self._parts:
            raise AttributeError(f"a {self.codec.name} store has parts {sorted(self._parts)}, "
                                 "not one float tensor")
        return self._parts["kv"]

    def num_bytes_allocated(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.parts.values())
        if self.tensor_scales is not None:
            total += self.tensor_scales.numel() * self.tensor_scales.element_size()
        return total

    def part(self, name: str, layer_idx: int, which: int) -> torch.Tensor:
        """One part of one layer's K (which=0) or V (1): [num_blocks, block_size, kv, ...]."""
        return self._parts[name][layer_idx, which]

    def keys(self, layer_idx: int) -> torch.Tensor:
        return self.kv[layer_idx, 0]  # [num_blocks, block_size, num_kv_heads, head_dim]

    def values(self, layer_idx: int) -> torch.Tensor:
        return self.kv[layer_idx, 1]

    def tensor_scale(self, layer_idx: int, which: int) -> torch.Tensor | None:
        return None if self.tensor_scales is None else self.tensor_scales[layer_idx, which]

    def _codec(self, which: int) -> KVCodec:
        return self.v_codec if which == 1 and self.v_codec is not None else self.codec

    def write(self, layer_idx: int, slot_mapping: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Encode new tokens' K and V [n, num_kv, d] into their slots (slot = block *
        block_size + offset), every part of the format alike."""
        for which, x in ((0, k), (1, v)):
            encoded = self._codec(which).encode(x, self.tensor_scale(layer_idx, which))
            for name, values in encoded.items():
                t = self._parts[name][layer_idx, which]
                t.view(-1, *t.shape[2:]).index_copy_(0, slot_mapping, values)

    def gather(self, layer_idx: int, block_ids: torch.Tensor, length: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` tokens of these blocks, decoded: K and V [num_kv, length, d]."""
        out = []
        for which in (0, 1):
            parts = {name: t[layer_idx, which].index_select(0, block_ids).flatten(0, 1)[:length]
                     for name, t in self._parts.items()}
            x = self._codec(which).decode(parts, dtype, self.tensor_scale(layer_idx, which))
            out.append(x.transpose(0, 1))
        return out[0], out[1]

    def read_blocks(self, block_ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Copies of these blocks on the host (pinned when the store is on CUDA), by part:
        each [num_layers, 2, len(block_ids), ...]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        out = {}
        for name, t in self.parts.items():
            blocks = t.index_select(2, index)
            host = torch.empty(blocks.shape, dtype=blocks.dtype, device="cpu",
                               pin_memory=t.is_cuda)
            host.copy_(blocks)
            out[name] = host
        return out

    def write_blocks(self, block_ids: tuple[int, ...], parts: dict[str, torch.Tensor]) -> None:
        """Write host copies (as read_blocks returns them) into these device blocks."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for name, t in self.parts.items():
            t.index_copy_(2, index, parts[name].to(self.device, non_blocking=True))
