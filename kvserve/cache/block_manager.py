"""Per-request block tables: the only writer of which physical blocks a request's tokens live in.

A request's token at position p lives in block table[p // block_size], slot p % block_size. Tables
grow a block at a time as tokens arrive (all or nothing per call) and are released whole when a
request finishes, is aborted or is preempted. No torch.
"""

from __future__ import annotations

from collections import Counter

from kvserve.cache.block_pool import BlockPool


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self.tables: dict[str, list[int]] = {}

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that the request's table holds num_tokens tokens."""
        have = len(self.tables.get(request_id, ()))
        return max(0, self.num_blocks_for(num_tokens) - have)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.pool.can_allocate(self.num_new_blocks(request_id, num_tokens))

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow the table to hold num_tokens tokens; False (and nothing taken) if blocks are short.
        """
        need = self.num_new_blocks(request_id, num_tokens)
        if not self.pool.can_allocate(need):
            return False
        self.tables.setdefault(request_id, []).extend(self.pool.allocate(need))
        return True

    def adopt(self, request_id: str, block_ids: list[int]) -> None:
        """Give a request a table of blocks allocated elsewhere (swap-in of preempted blocks)."""
        assert request_id not in self.tables, f"{request_id} already has blocks"
        self.tables[request_id] = list(block_ids)

    def block_ids(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def num_blocks_held(self, request_id: str) -> int:
        return len(self.tables.get(request_id, ()))

    def free(self, request_id: str) -> list[int]:
        """Release the request's blocks; returns the ids it held, in table order."""
        block_ids = self.tables.pop(request_id, [])
        self.pool.free(block_ids)
        return block_ids

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        held = Counter(b for table in self.tables.values() for b in table)
        for b, count in held.items():
            assert self.pool.ref_counts[b] >= count, (
                f"block {b} is in {count} tables but has {self.pool.ref_counts[b]} references")
            assert b not in self.pool.free_queue, f"block {b} is in a table and free"
        assert sum(self.pool.ref_counts) == sum(held.values()), "a referenced block is in no table"
