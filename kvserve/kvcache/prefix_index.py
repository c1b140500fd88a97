"""The prefix index of automatic prefix caching: full blocks are indexed by a chained hash of
everything that decides their K/V, so a request whose prompt starts with cached blocks reuses them.
No torch.

A block's key is sha256(parent key, its token ids); the root key carries the extra keys (model
identity, adapter, the request's cache salt), so every key in a chain inherits them and blocks
made under one salt can never be found under another. The index also keeps each block's token
ids and checks them on lookup: a key collision could only ever cost a miss, never wrong K/V.
Which blocks exist and when they are reused is the BlockPool's business (its free queue is the
eviction order); this index forgets a block the moment the pool hands it out again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from kvserve.kvcache.events import BlockEvent, BlockEventKind, EventLog

BlockKey = bytes


def root_key(extra_keys: tuple) -> BlockKey:
    """The parent key of a sequence's first block: model identity, adapter, cache salt."""
    return hashlib.sha256(repr(extra_keys).encode()).digest()


def block_key(parent: BlockKey, token_ids: Sequence[int]) -> BlockKey:
    h = hashlib.sha256(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def chain_keys(parent: BlockKey, token_ids: Sequence[int], block_size: int,
               start_block: int = 0) -> list[BlockKey]:
    """Keys of the full blocks of token_ids from block start_block on, chained from parent (the
    key of block start_block - 1, or the root)."""
    keys = []
    for b in range(start_block, len(token_ids) // block_size):
        parent = block_key(parent, token_ids[b * block_size:(b + 1) * block_size])
        keys.append(parent)
    return keys


@dataclass(frozen=True)
class CachedBlock:
    block_id: int
    token_ids: tuple[int, ...]
    tenant: str | None  # events.tenant_hash of the salt it was made under


class PrefixIndex:
    def __init__(self, events: EventLog | None = None) -> None:
        self.events = events if events is not None else EventLog()
        self.index: dict[BlockKey, CachedBlock] = {}
        self.key_of: dict[int, BlockKey] = {}  # block id -> its key, for eviction
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.num_evictions = 0

    @property
    def num_cached_blocks(self) -> int:
        return len(self.index)

    def lookup(self, keys: Sequence[BlockKey], token_ids: Sequence[int],
               block_size: int) -> list[int]:
        """Block ids of the longest run of `keys` (a sequence's leading full blocks) that is
        cached with exactly these tokens."""
        hits = []
        for i, key in enumerate(keys):
            cached = self.index.get(key)
            if cached is None or cached.token_ids != tuple(
                    token_ids[i * block_size:(i + 1) * block_size]):
                break
            hits.append(cached.block_id)
        return hits

    def record_query(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.num_queried_tokens += num_queried_tokens
        self.num_hit_tokens += num_hit_tokens

    def insert(self, key: BlockKey, block_id: int, token_ids: Sequence[int],
               tenant: str | None = None) -> bool:
        """Index a block that has just been filled; False if the key is already cached (another
        sequence computed the same block first: that copy stays the one found) or the block
        already carries a key."""
        if key in self.index or block_id in self.key_of:
            return False
        self.index[key] = CachedBlock(block_id, tuple(token_ids), tenant)
        self.key_of[block_id] = key
        self.events.emit(BlockEvent(BlockEventKind.STORED, block_id, key, tenant))
        return True

    def evict(self, block_id: int) -> bool:
        """Forget a block the pool is handing out for new tokens; True if it was cached."""
        key = self.key_of.pop(block_id, None)
        if key is None:
            return False
        cached = self.index.pop(key)
        self.num_evictions += 1
        self.events.emit(BlockEvent(BlockEventKind.EVICTED, block_id, key, cached.tenant))
        return True

    def reset(self) -> int:
        """Forget every cached block (their memory stays with whoever holds it); returns how many
        were forgotten. Each counts as an eviction, and is reported as one."""
        n = len(self.index)
        self.num_evictions += n
        for key, cached in self.index.items():
            self.events.emit(BlockEvent(BlockEventKind.EVICTED, cached.block_id, key,
                                        cached.tenant))
        self.index.clear()
        self.key_of.clear()
        return n

    def key_of_block(self, block_id: int) -> BlockKey | None:
        return self.key_of.get(block_id)

    def tenant_of_block(self, block_id: int) -> str | None:
        key = self.key_of.get(block_id)
        return None if key is None else self.index[key].tenant

    def check_invariants(self) -> None:
        assert len(self.index) == len(self.key_of), "index and reverse map differ in size"
        for key, cached in self.index.items():
            assert self.key_of.get(cached.block_id) == key, (
                f"block {cached.block_id} indexed under a key it does not carry")
