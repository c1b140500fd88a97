"""The paged K/V tensors, shaped by KVLayout: one store per layer, carved into blocks.

The storage knows nothing of requests (block tables live in block_manager.py); it allocates once,
at start-up, and is never grown. It also executes block copies for swap preemption.
"""

from __future__ import annotations

import torch

from kvserve.cache.layout import KVLayout


class PagedKVStorage:
    def __init__(self, layout: KVLayout, num_blocks: int, dtype: torch.dtype,
                 device: torch.device):
        self.layout = layout
        self.num_blocks = num_blocks
        s = layout.spec
        # [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]; zeroed so an
        # unwritten slot can never feed NaN into a masked computation.
        self.kv = torch.zeros((s.num_layers, 2, num_blocks, *layout.block_shape), dtype=dtype,
                              device=device)
        self.host_copies: dict[str, torch.Tensor] = {}  # swapped-out requests' blocks

    def num_bytes_allocated(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def keys(self, layer_idx: int) -> torch.Tensor:
        return self.kv[layer_idx, 0]  # [num_blocks, block_size, num_kv_heads, head_dim]

    def values(self, layer_idx: int) -> torch.Tensor:
        return self.kv[layer_idx, 1]

    def swap_out(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        """Copy a preempted request's blocks to host memory (pinned when the store is on CUDA)."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.kv.device)
        blocks = self.kv.index_select(2, index)  # [layers, 2, n, block_size, kv_heads, d]
        host = torch.empty(blocks.shape, dtype=blocks.dtype, device="cpu",
                           pin_memory=self.kv.is_cuda)
        host.copy_(blocks)
        self.host_copies[request_id] = host

    def swap_in(self, request_id: str, block_ids: tuple[int, ...]) -> None:
        host = self.host_copies.pop(request_id)
        index = torch.tensor(block_ids, dtype=torch.long, device=self.kv.device)
        self.kv.index_copy_(2, index, host.to(self.kv.device, non_blocking=True))

    def drop(self, request_id: str) -> None:
        self.host_copies.pop(request_id, None)
