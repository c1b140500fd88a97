"""The paged K/V tensors, shaped by KVLayout: one store per layer, carved into blocks.

The store knows nothing of requests (block tables live in kvcache/block_manager.py); it allocates
once, at start-up, and is never grown. Its tensors are named parts of one layout format (float
formats have one, "kv"; a quantized format adds its codes and scales), each with the block index
on dimension 2, so block copies move every part of a block together.
"""

from __future__ import annotations

import torch

from kvserve.kvcache.layout import KVLayout

TORCH_KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}


class PagedKVStore:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device):
        name = layout.format.name
        if name not in TORCH_KV_DTYPES:
            raise NotImplementedError(f"the paged store holds float formats only, not {name}")
        self.layout = layout
        self.num_blocks = num_blocks
        self.dtype = TORCH_KV_DTYPES[name]
        self.device = device
        s = layout.spec
        # [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]; zeroed so an
        # unwritten slot can never feed NaN into a masked computation.
        self.kv = torch.zeros((s.num_layers, 2, num_blocks, *layout.block_shape),
                              dtype=self.dtype, device=device)

    @property
    def parts(self) -> dict[str, torch.Tensor]:
        """Every tensor of the store by name, block index on dimension 2."""
        return {"kv": self.kv}

    def num_bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def keys(self, layer_idx: int) -> torch.Tensor:
        return self.kv[layer_idx, 0]  # [num_blocks, block_size, num_kv_heads, head_dim]

    def values(self, layer_idx: int) -> torch.Tensor:
        return self.kv[layer_idx, 1]

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
