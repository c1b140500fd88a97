"""Per-request block tables: the only writer of which physical blocks a request's tokens live in.

A request's token at position p lives in block table[p // block_size], slot p % block_size. Tables
grow a block at a time as tokens arrive (all or nothing per call) and are released whole when a
request finishes, is aborted or is preempted. Under a window or sinks policy (kvcache/policy.py)
the run of blocks no layer reads any more is released mid-sequence: their table entries become
HOLE, so positions keep their indices. With a PrefixIndex, a new request's table starts
with the cached blocks its prompt begins with (shared by reference count), every block a request
fills is offered to the index, and a block the pool hands out again is forgotten by the index.
A hit needs only the blocks attention will read: under a window, those of the window before the
first uncached token (the ones before it may have been evicted long ago).

A model whose layers read different blocks (global and windowed layers) has one table per KV
group (kvcache/groups.py), each with its own policy, over one pool: a request's position p lives
in each group's table[p // block_size]; groups after the first index their blocks under the
block key plus the group's number.

Only full blocks are ever shared, and a request writes only slots at or past its computed count,
which lie past every block it was given from the index (at least its last prompt token is always
computed): no sequence ever writes into a block another can read, so no copy-on-write is needed.
No torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import accumulate

from kvserve.kvcache.block_pool import BlockPool
from kvserve.kvcache.events import BlockEvent, BlockEventKind, EventLog
from kvserve.kvcache.policy import FullHistory, PerGroup, RetentionPolicy, most_blocks_held
from kvserve.kvcache.prefix_index import PrefixIndex, chain_keys, root_key
from kvserve.kvcache.snapshot import EventCounts, PoolSnapshot, PrefixSnapshot, RequestBlocks
from kvserve.kvcache.tiers import LowerTiers, TierBlock, TierOps
from kvserve.request import Request

HOLE = -1  # a released block's place in a table: no layer reads its tokens any more


class GroupTables:
    """One KV group's tables: what its layers' retention policy keeps of each request."""

    def __init__(self, policy: RetentionPolicy, number: int, num_layers: int):
        self.policy = policy
        self.suffix = bytes([number]) if number else b""  # its block keys: key + suffix
        self.num_layers = num_layers
        self.tables: dict[str, list[int]] = {}
        self.num_indexed: dict[str, int] = {}  # request id -> leading blocks offered to the index
        self.holes: dict[str, range] = {}  # request id -> the run of its table that is HOLE
        self.parked_holes: dict[str, range] = {}  # the same, for requests swapped out
        self.parked_blocks: dict[str, int] = {}  # blocks a swapped-out request had here


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int, prefix_index: PrefixIndex | None = None,
                 model_key: str = "", policy: RetentionPolicy | None = None,
                 lower: LowerTiers | None = None,
                 groups: Sequence[tuple[RetentionPolicy, int]] | None = None):
        """groups: each KV group's policy and layer count (None: one table, under policy)."""
        self.pool = pool
        self.block_size = block_size
        self.prefix_index = prefix_index  # None: prefix caching off
        # One log for the index's stored/evicted events and the pool's freed ones.
        self.events = prefix_index.events if prefix_index is not None else EventLog()
        self.model_key = model_key  # the model identity every block key starts from
        specs = list(groups) if groups else [(policy or FullHistory(), 1)]
        self.groups = [GroupTables(p, g, n) for g, (p, n) in enumerate(specs)]
        self.policy: RetentionPolicy = (self.groups[0].policy if len(self.groups) == 1
                                        else PerGroup([p for p, _ in specs]))
        # Tiers below the pool (prefix caching only, one group): evicted cached blocks move
        # down, hits there come back up.
        self.lower = lower if prefix_index is not None else None

    # the first (or only) group's tables, by the names they had before groups
    @property
    def tables(self) -> dict[str, list[int]]:
        return self.groups[0].tables

    @property
    def holes(self) -> dict[str, range]:
        return self.groups[0].holes

    @property
    def parked_holes(self) -> dict[str, range]:
        return self.groups[0].parked_holes

    @property
    def num_indexed(self) -> dict[str, int]:
        return self.groups[0].num_indexed

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def most_blocks_held(self, num_tokens: int, step_tokens: int) -> int:
        """The most blocks a sequence of num_tokens tokens holds at once: every one of them
        under full history; under a sliding window, at most its window's keys' and one step's
        (of up to step_tokens) new tokens', however long it grows."""
        return most_blocks_held([g.policy for g in self.groups], num_tokens, step_tokens,
                                self.block_size)

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that the request's tables hold num_tokens tokens."""
        need = self.num_blocks_for(num_tokens)
        return sum(max(0, need - len(g.tables.get(request_id, ()))) for g in self.groups)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.pool.can_allocate(self.num_new_blocks(request_id, num_tokens))

    def uncached_free_blocks(self, limit: int) -> int:
        """Free blocks the next allocations would take without evicting a cached prefix (the
        run at the free queue's head that holds none), counted up to limit."""
        index, n = self.prefix_index, 0
        for b in self.pool.free_queue:
            if n >= limit or (index is not None and index.key_of_block(b) is not None):
                break
            n += 1
        return n

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow the table to hold num_tokens tokens; False (and nothing taken) if blocks are short.
        """
        need = self.num_new_blocks(request_id, num_tokens)
        if not self.pool.can_allocate(need):
            return False
        block_ids = self.allocate_blocks(need)
        per_table = self.num_blocks_for(num_tokens)
        for g in self.groups:
            table = g.tables.setdefault(request_id, [])
            add = max(0, per_table - len(table))
            table.extend(block_ids[:add])
            del block_ids[:add]
        return True

    def allocate_blocks(self, num_blocks: int) -> list[int]:
        """Blocks for new K/V, least recently freed first: cached ones among them are evicted."""
        block_ids = self.pool.allocate(num_blocks)
        index = self.prefix_index
        if index is not None:
            for b in block_ids:
                key = index.key_of_block(b)
                if key is not None and self.lower is not None:
                    cached = index.index[key]
                    self.lower.offload(b, key, TierBlock(cached.token_ids, cached.tenant))
                index.evict(b)
        return block_ids

    # -- prefix caching ------------------------------------------------------------------------
    def _extend_keys(self, r: Request, num_tokens: int) -> None:
        """Chain r.block_keys over the full blocks of its first num_tokens tokens."""
        have, bs = len(r.block_keys), self.block_size
        if have >= num_tokens // bs:
            return
        parent = r.block_keys[-1] if have else root_key((self.model_key, None, r.cache_salt))
        tokens = r.token_ids_between(have * bs, (num_tokens // bs) * bs)
        r.block_keys.extend(chain_keys(parent, tokens, bs))

    def match_prefix(self, r: Request) -> int:
        """Start the tables of a request that holds no blocks with the longest cached prefix of
        its full blocks that attention can resume from, stopping short of its last token (its
        logits must be computed); returns the tokens that need no prefill. Each group needs the
        blocks its policy still reads at that point (under a window, only the window's)."""
        if self.prefix_index is None:
            return 0
        assert r.request_id not in self.tables, f"{r.request_id} already has blocks"
        bs = self.block_size
        max_blocks = (r.num_tokens - 1) // bs
        self._extend_keys(r, max_blocks * bs)
        tokens = r.token_ids_between(0, max_blocks * bs)
        if self.lower is not None:  # tiers below: a run from the first block, then theirs
            hits = self.prefix_index.lookup(r.block_keys[:max_blocks], tokens, bs)
            self.pool.incref(hits)  # a hit on a free block takes it back out of the free queue
            self.tables[r.request_id] = list(hits)
            if len(hits) < max_blocks:
                hits = hits + self._fetch_from_lower(r, len(hits), max_blocks)
            self.lower.unpin(r.request_id)  # what it waited for is on the device now
            self.num_indexed[r.request_id] = len(hits)
            # Under a window, hits before it are read by no layer: back to the pool (still
            # cached) now, before this step's blocks are counted against it.
            self._release(r.request_id, len(hits) * bs)
            return len(hits) * bs
        num_hit, found = self._needed_hits(r.block_keys[:max_blocks], tokens)
        for g, row in zip(self.groups, found):
            gone = g.policy.released_blocks(num_hit * bs, bs)
            gone = range(min(gone.start, num_hit), min(gone.stop, num_hit))
            table = [HOLE if i in gone else b for i, b in enumerate(row[:num_hit])]
            self.pool.incref([b for b in table if b != HOLE])  # revived from the free queue
            g.tables[r.request_id] = table
            g.num_indexed[r.request_id] = num_hit
            if gone:
                g.holes[r.request_id] = gone
        return num_hit * bs

    def _needed_hits(self, keys: list[bytes], tokens: list[int]) -> tuple[int, list[list]]:
        """The most leading blocks n such that every group has, cached with these tokens, each
        block of [0, n) its policy reads once n blocks are computed; with each group's cached
        block ids by position (None where it has none, up to the most n can be)."""
        bs, index = self.block_size, self.prefix_index.index
        most = len(keys)  # no hit goes past a full group's first miss or a group's last hit
        found = []
        for g in self.groups:
            row: list[int | None] = []
            full = isinstance(g.policy, FullHistory)
            for i in range(most):
                cached = index.get(keys[i] + g.suffix)
                ok = cached is not None and cached.token_ids == tuple(tokens[i * bs:(i + 1) * bs])
                if not ok and full:
                    break  # full history reads every block
                row.append(cached.block_id if ok else None)
            while row and row[-1] is None:
                row.pop()
            most = min(most, len(row))
            found.append(row)
        found = [row[:most] + [None] * (most - len(row[:most])) for row in found]
        misses = [[0, *accumulate(b is None for b in row)] for row in found]
        for n in range(most, 0, -1):
            if all(self._reads_only_cached(g.policy.released_blocks(n * bs, bs), n, m)
                   for g, m in zip(self.groups, misses)):
                return n, found
        return 0, found

    @staticmethod
    def _reads_only_cached(gone: range, n: int, misses: list[int]) -> bool:
        """Whether blocks [0, n) outside `gone` are all cached (misses: running miss counts)."""
        lo, hi = min(gone.start, n), min(max(gone.stop, gone.start), n)
        return misses[lo] == 0 and misses[n] == misses[hi]

    def _fetch_from_lower(self, r: Request, first: int, max_blocks: int) -> list[int]:
        """Device blocks for the run of r's blocks [first, max_blocks) that a lower tier holds
        and the cost model says to fetch (as many as the pool has free blocks for), indexed at
        once: their K/V arrive before this step's forward."""
        bs = self.block_size
        keys = r.block_keys[first:max_blocks]
        found = self.lower.match(keys, r.token_ids_between(first * bs, max_blocks * bs), first * bs)
        found = found[:self.pool.num_free_blocks]
        if not found:
            return []
        block_ids = self.allocate_blocks(len(found))
        self.tables[r.request_id].extend(block_ids)
        for key, block_id, block in zip(keys, block_ids, found):
            self.prefix_index.insert(key, block_id, block.token_ids, block.tenant)
        self.lower.fetch_run(r.request_id, list(zip(block_ids, keys)), first * bs)
        return block_ids

    def must_wait(self, r: Request) -> bool:
        """Whether r, not yet admitted, should wait for blocks loading from a tier below the
        host (reads of a disk hit past its device and host hits, or of Redis, start here)."""
        if (self.lower is None or (self.lower.disk is None and not self.lower.redis)
                or r.request_id in self.tables
                or r.num_computed_tokens or r.params.prompt_logprobs is not None):
            return False
        bs = self.block_size
        max_blocks = (r.num_tokens - 1) // bs
        self._extend_keys(r, max_blocks * bs)
        first = len(self.prefix_index.lookup(r.block_keys[:max_blocks],
                                             r.token_ids_between(0, max_blocks * bs), bs))
        return self.lower.prefetch(r.request_id, r.block_keys[first:max_blocks],
                                   r.token_ids_between(first * bs, max_blocks * bs), first * bs)

    def evict_cached(self) -> int:
        """Every cached block no request holds leaves the pool's index now, copied down to the
        tiers below (as if the pool had handed it out again); returns how many."""
        index = self.prefix_index
        if index is None:
            return 0
        evicted = [b for b in self.pool.free_queue if index.key_of_block(b) is not None]
        for b in evicted:
            key = index.key_of_block(b)
            if self.lower is not None:
                cached = index.index[key]
                self.lower.offload(b, key, TierBlock(cached.token_ids, cached.tenant))
            index.evict(b)
        return len(evicted)

    def take_tier_ops(self) -> TierOps | None:
        """What the plan being built moves between the pool and the tiers below it."""
        return None if self.lower is None else self.lower.take_ops()

    def park(self, num_blocks: int) -> None:
        """num_blocks of a preempted request are swapped out to host memory (a lower host tier
        makes room for them)."""
        if self.lower is not None:
            self.lower.park(num_blocks)

    def unpark(self, num_blocks: int) -> None:
        if self.lower is not None:
            self.lower.unpark(num_blocks)

    def record_admission(self, r: Request, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix lookup in the hit rate (a lookup whose admission
        failed for want of blocks is retried later and counted then, once)."""
        if self.prefix_index is not None:
            self.prefix_index.record_query(r.num_tokens, num_hit_tokens)

    def next_uncached_key(self, r: Request) -> bytes | None:
        """Key of the first full block of r's prompt that is not cached (None if there is none)."""
        if self.prefix_index is None:
            return None
        max_blocks = (r.num_tokens - 1) // self.block_size
        self._extend_keys(r, max_blocks * self.block_size)
        for key in r.block_keys[:max_blocks]:
            if key not in self.prefix_index.index:
                return key
        return None

    def cache_full_blocks(self, r: Request) -> None:
        """Offer the prefix index every block of r that its computed tokens have filled."""
        if self.prefix_index is None or r.request_id not in self.tables:
            return
        bs = self.block_size
        tenant = self.events.tenant_hash(r.cache_salt)
        for g in self.groups:
            table = g.tables[r.request_id]
            num_full = min(r.num_computed_tokens // bs, len(table))
            exact = g.policy.exact_blocks(bs)
            if exact is not None:  # later blocks' K/V depend on what this request released
                num_full = min(num_full, exact)
            first = g.num_indexed.get(r.request_id, 0)
            if num_full <= first:
                continue
            self._extend_keys(r, num_full * bs)
            tokens = r.token_ids_between(first * bs, num_full * bs)
            for i in range(first, num_full):
                offset = (i - first) * bs
                block_tokens = tokens[offset:offset + bs]
                if table[i] == HOLE:
                    continue
                key = r.block_keys[i] + g.suffix
                if self.prefix_index.insert(key, table[i], block_tokens, tenant) \
                        and self.lower is not None:  # a shared tier below gets it now
                    self.lower.publish(table[i], key, TierBlock(tuple(block_tokens), tenant))
            g.num_indexed[r.request_id] = num_full

    def release_unread(self, r: Request) -> list[int]:
        """Under a window policy: release the request's leading blocks that no layer reads once
        its computed tokens are in (after cache_full_blocks offered them to the index, which
        keeps them while the pool does). Returns the blocks that became free."""
        return self._release(r.request_id, r.num_computed_tokens)

    def _release(self, request_id: str, num_computed: int) -> list[int]:
        freed = []
        for g in self.groups:
            table = g.tables.get(request_id)
            if table is None or isinstance(g.policy, FullHistory):
                continue
            run = g.policy.released_blocks(num_computed, self.block_size)
            held = g.holes.get(request_id, range(run.start, run.start))
            end = min(run.stop, len(table))
            if end <= held.stop:
                continue
            released = table[held.stop:end]
            table[held.stop:end] = [HOLE] * (end - held.stop)
            g.holes[request_id] = range(run.start, end)
            freed += self._unref(released)
        return freed

    def num_tokens_released(self, request_id: str) -> int:
        """Tokens whose K/V left the pool, averaged over the layers (a group's released
        tokens count for its share of them)."""
        layers = sum(g.num_layers for g in self.groups)
        return sum(len(g.holes.get(request_id, ())) * self.block_size * g.num_layers
                   for g in self.groups) // layers

    def blocks_to_resume(self, request_id: str, num_tokens: int) -> int:
        """Pool blocks a swapped-out request needs to come back holding num_tokens tokens: its
        parked blocks, or more where the step needs more (its holes come back as holes)."""
        need = self.num_blocks_for(num_tokens)
        return sum(max(g.parked_blocks.get(request_id, 0),
                       need - len(g.parked_holes.get(request_id, ())))
                   for g in self.groups)

    def adopt(self, request_id: str, block_ids: list[int]) -> None:
        """Give a request the tables of blocks allocated elsewhere (swap-in of preempted blocks,
        in the order free(swap=True) returned them), after the holes it had when it was
        swapped out."""
        assert request_id not in self.tables, f"{request_id} already has blocks"
        block_ids = list(block_ids)
        for g in self.groups:
            n = g.parked_blocks.pop(request_id, len(block_ids))
            holes = g.parked_holes.pop(request_id, range(0))
            table = block_ids[:n]
            del block_ids[:n]
            table[holes.start:holes.start] = [HOLE] * len(holes)
            g.tables[request_id] = table
            if holes:
                g.holes[request_id] = holes
        assert not block_ids, f"{len(block_ids)} blocks adopted by no table"

    def block_ids(self, request_id: str) -> list[int]:
        """The request's table (the first group's), HOLE where a block was released."""
        return self.tables.get(request_id, [])

    def group_block_ids(self, request_id: str) -> tuple[tuple[int, ...], ...]:
        """The tables of the groups after the first (none with one table)."""
        return tuple(tuple(g.tables.get(request_id, ())) for g in self.groups[1:])

    def num_blocks_held(self, request_id: str) -> int:
        return sum(len(g.tables.get(request_id, ())) - len(g.holes.get(request_id, ()))
                   for g in self.groups)

    def free(self, request_id: str, swap: bool = False) -> list[int]:
        """Release the request's blocks; returns the ids it held, table by table in table order
        (its holes left out; swap: remembered, so that adopt() puts them back)."""
        block_ids = []
        for g in self.groups:
            if not swap:  # a swapped-out request that ends: its holes are forgotten too
                g.parked_holes.pop(request_id, None)
                g.parked_blocks.pop(request_id, None)
            holes = g.holes.pop(request_id, range(0))
            if swap and holes:
                g.parked_holes[request_id] = holes
            held = [b for b in g.tables.pop(request_id, []) if b != HOLE]
            if swap:
                g.parked_blocks[request_id] = len(held)
            block_ids += held
            g.num_indexed.pop(request_id, None)
        if self.lower is not None:  # fetches planned for it whose K/V will not arrive now
            for b in self.lower.cancel(request_id):
                self.prefix_index.evict(b)
        # Tail first: a chain's last blocks reach the head of the free queue (evicted first)
        # before the prefix blocks that other prompts are likelier to share.
        self._unref(reversed(block_ids))
        return block_ids

    def _unref(self, block_ids) -> list[int]:
        freed = self.pool.free(block_ids)
        for b in freed:
            index = self.prefix_index
            key = index.key_of_block(b) if index is not None else None
            tenant = index.tenant_of_block(b) if key is not None else None
            self.events.emit(BlockEvent(BlockEventKind.FREED, b, key, tenant))
        return freed

    def reset_prefix_index(self) -> bool:
        """Forget every cached block (their memory stays with whoever holds it); False if
        prefix caching is off."""
        if self.prefix_index is None:
            return False
        self.prefix_index.reset()
        return True

    # -- reporting -----------------------------------------------------------------------------
    def pool_snapshot(self, peak_used_blocks: int) -> PoolSnapshot:
        share = max(g.num_layers for g in self.groups) / sum(g.num_layers for g in self.groups)
        return PoolSnapshot(self.block_size, self.pool.num_blocks, self.pool.num_used_blocks,
                            peak_used_blocks, share)

    def prefix_snapshot(self) -> PrefixSnapshot | None:
        index = self.prefix_index
        if index is None:
            return None
        return PrefixSnapshot(index.num_queried_tokens, index.num_hit_tokens,
                              index.num_cached_blocks, index.num_evictions)

    def event_counts(self) -> EventCounts:
        c = self.events.counts
        return EventCounts(c[BlockEventKind.STORED], c[BlockEventKind.EVICTED],
                           c[BlockEventKind.FREED], self.events.num_dropped)

    def request_blocks(self, requests: list[Request]) -> tuple[RequestBlocks, ...]:
        """Each request's blocks, table after table (HOLE where released)."""
        return tuple(RequestBlocks(r.request_id, r.num_computed_tokens, tuple(
            b for g in self.groups for b in g.tables.get(r.request_id, ())))
                     for r in requests)

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        held = Counter(b for g in self.groups for table in g.tables.values() for b in table
                       if b != HOLE)
        for g in self.groups:
            assert g.tables.keys() == self.tables.keys(), "a request lacks a group's table"
            for rid, table in g.tables.items():
                holes = g.holes.get(rid, range(0))
                assert [i for i, b in enumerate(table) if b == HOLE] == list(holes), (
                    f"{rid}: its HOLEs are not the run it released")
        for b, count in held.items():
            assert self.pool.ref_counts[b] >= count, (
                f"block {b} is in {count} tables but has {self.pool.ref_counts[b]} references")
            assert b not in self.pool.free_queue, f"block {b} is in a table and free"
        assert sum(self.pool.ref_counts) == sum(held.values()), "a referenced block is in no table"
        if self.prefix_index is not None:
            self.prefix_index.check_invariants()
            # A shared block was full when shared: it lies among each holder's indexed blocks.
            for g in self.groups:
                for rid, table in g.tables.items():
                    for b in table[g.num_indexed.get(rid, 0):]:
                        if b != HOLE:
                            assert held[b] == 1, f"{rid} may write block {b}, which others read"
