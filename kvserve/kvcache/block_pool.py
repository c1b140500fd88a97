"""The block pool: which physical KV blocks exist, who references them, which are free. No torch.

Blocks are ids 0..num_blocks-1; the pool knows nothing of their contents (kvserve.kvstore holds
the tensors) and nothing of requests (block_manager.py maps requests to blocks). A block whose
reference count drops to zero goes to the tail of the free queue, so the queue is in eviction
order (least recently freed first) for the prefix cache to build on. Allocation and free are O(1)
per block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from kvserve.errors import KVServeError


class NoFreeBlocksError(KVServeError):
    """An allocation asked for more blocks than are free (callers check can_allocate first)."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # block id -> None, oldest-freed first: popitem(last=False) takes the head in O(1) and
        # a shared block can leave the middle in O(1) when the prefix cache revives it.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free_queue)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take num_blocks free blocks (reference count 1 each), all or none."""
        if num_blocks > len(self.free_queue):
            raise NoFreeBlocksError(
                f"asked for {num_blocks} blocks, {len(self.free_queue)} free")
        block_ids = [self.free_queue.popitem(last=False)[0] for _ in range(num_blocks)]
        for b in block_ids:
            self.ref_counts[b] = 1
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Share blocks that are already in use (copy-on-write forks, prefix hits)."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]  # revived from the free queue
            self.ref_counts[b] += 1

    def free(self, block_ids: Iterable[int]) -> list[int]:
        """Drop one reference to each block; a block no one references becomes free. Returns
        the blocks that became free, in the order they joined the free queue."""
        freed = []
        for b in block_ids:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_queue[b] = None
                freed.append(b)
        return freed

    def check_invariants(self) -> None:
        assert all(rc >= 0 for rc in self.ref_counts), "negative reference count"
        free = set(self.free_queue)
        in_use = {b for b, rc in enumerate(self.ref_counts) if rc > 0}
        assert not free & in_use, f"blocks both free and in use: {sorted(free & in_use)[:8]}"
        assert len(free) + len(in_use) == self.num_blocks, "a block is neither free nor in use"
