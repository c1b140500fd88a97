"""Host-memory copies of device blocks, each under the key a BlockTransfer names it by.

Swap preemption parks a request's blocks here (keys owned by the request, dropped when it ends);
the prefix cache's host tier keeps evicted cached blocks here under their block keys, each in
memory of its own (kvcache.tiers decides which, and when they go).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch


class HostBlockStore:
    def __init__(self, pin_memory: bool = False) -> None:
        # key -> that block's parts, each [num_layers, 1, ...] (a view of one batched copy)
        self.blocks: dict[Hashable, dict[str, torch.Tensor]] = {}
        self.owner_of: dict[Hashable, str] = {}  # key -> the request that parked it (swap)
        self.owned: dict[str, set[Hashable]] = {}  # request id -> keys it has parked here
        self.pin_memory = pin_memory  # page-locked batches: asynchronous copies to CUDA

    def __len__(self) -> int:
        return len(self.blocks)

    def put(self, keys: tuple[Hashable, ...], parts: dict[str, torch.Tensor],
            owner: str | None = None) -> None:
        """Keep block i of every part (dimension 1) under keys[i]."""
        for i, key in enumerate(keys):
            self.blocks[key] = {name: t[:, i:i + 1] for name, t in parts.items()}
            if owner is not None:
                self.owner_of[key] = owner
                self.owned.setdefault(owner, set()).add(key)

    def keep(self, keys: tuple[Hashable, ...], parts: dict[str, torch.Tensor]) -> None:
        """As put, each block copied into memory of its own (a cached block outlives the
        others of its batch, and the host tier counts blocks, not batches)."""
        for i, key in enumerate(keys):
            self.blocks[key] = {name: t[:, i:i + 1].clone() for name, t in parts.items()}

    def drop(self, key: Hashable) -> None:
        self.blocks.pop(key, None)

    def take(self, keys: tuple[Hashable, ...]) -> dict[str, torch.Tensor]:
        """Remove these blocks and return them batched in key order, by part (in page-locked
        memory when pin_memory)."""
        return self._batch([self._pop(k) for k in keys])

    def copy(self, keys: tuple[Hashable, ...]) -> dict[str, torch.Tensor]:
        """These blocks batched in key order, by part; they stay here."""
        return self._batch([self.blocks[k] for k in keys])

    def _batch(self, entries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = {}
        for name, first in entries[0].items():
            shape = (first.shape[0], len(entries), *first.shape[2:])
            batch = torch.empty(shape, dtype=first.dtype, pin_memory=self.pin_memory)
            torch.cat([e[name] for e in entries], dim=1, out=batch)
            out[name] = batch
        return out

    def _pop(self, key: Hashable) -> dict[str, torch.Tensor]:
        owner = self.owner_of.pop(key, None)
        if owner is not None:
            self.owned[owner].discard(key)
            if not self.owned[owner]:
                del self.owned[owner]
        return self.blocks.pop(key)

    def release_owner(self, owner: str) -> None:
        """Forget every block a request parked here (it ended while swapped out)."""
        for key in self.owned.pop(owner, ()):
            self.blocks.pop(key, None)
            self.owner_of.pop(key, None)
