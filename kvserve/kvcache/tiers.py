"""Lower tiers of the prefix cache: what each holds (by block key, LRU), what a step must move
between them and the device pool, and whether a hit there is worth fetching. No torch.

Tiers: host RAM, then a local disk, then a Redis server shared by several processes. Write
policy: write-back on eviction, tier by tier, except Redis (write-through, below). A cached
block leaves the device pool only when the pool hands it out again; it is then copied into the
host tier (unless a copy is
already there: the host keeps what it sent up, so a block that goes back and forth is copied
down once). A block the host tier's LRU pushes out is written to the disk tier (unless the disk
holds it already) or, without one, dropped; the disk's LRU deletes its oldest entries. A disk
hit is read back into the host tier off the step loop (its request waits, pinned blocks and
all, while others run), then fetched into the pool like a host hit. Swapped-out blocks of
preempted requests live in the same host memory: they are parked there (never evicted while
their request waits) and push cached blocks out to make room. Redis is write-through: a block
is put there as soon as the pool caches it, so other processes can fetch it at once; a prompt's
run past the device, host and disk hits is asked of Redis in one round trip (keys it did not
have are not asked again for MISSING_TTL_S).

Keys are the device pool's chained block keys, whose root carries the model identity, the KV
format and the request's cache salt: a tier can only ever answer a lookup made under the same
tenant, model and format, and it checks the block's token ids as the device index does.
The K/V bytes are the runner's (kvstore.host); this module decides and records.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvserve.kvcache.costs import Decision, PrefillRate, TransferRate, decide

BlockKey = bytes


@dataclass(frozen=True)
class TierBlock:
    token_ids: tuple[int, ...]
    tenant: str | None  # events.tenant_hash of the salt its K/V was made under


@dataclass
class TierCounters:
    num_hit_blocks: int = 0  # blocks found here past the device pool's hits
    num_fetched_blocks: int = 0  # ... brought up (the cost model chose fetch)
    num_recomputed_blocks: int = 0  # ... recomputed instead (the cost model chose recompute)
    num_fetch_decisions: int = 0
    num_recompute_decisions: int = 0
    num_stored_blocks: int = 0  # blocks copied into this tier
    num_evicted_blocks: int = 0  # blocks its LRU pushed out
    num_rejected_entries: int = 0  # corrupt, truncated, foreign or missing entries dropped
    num_bytes_in: int = 0
    num_bytes_out: int = 0
    expected_saved_s: float = 0.0  # sum over fetches of expected (recompute - fetch) seconds


@dataclass(frozen=True)
class TierSnapshot:
    name: str
    capacity_blocks: int
    num_blocks: int  # cached blocks held
    num_parked_blocks: int  # swapped-out blocks of preempted requests (host tier)
    bytes_per_s: float  # the cost model's current bandwidth of this tier
    latency_s: float
    counters: TierCounters


class TierIndex:
    """One lower tier's cached blocks by key, least recently used first."""

    def __init__(self, name: str, capacity_blocks: int):
        if capacity_blocks < 0:
            raise ValueError(f"a tier's capacity cannot be negative, got {capacity_blocks}")
        self.name = name
        self.capacity_blocks = capacity_blocks
        self.entries: OrderedDict[BlockKey, TierBlock] = OrderedDict()
        self.num_parked = 0  # blocks held for swapped-out requests (never evicted)
        self.pinned: dict[BlockKey, int] = {}  # key -> waiting requests that need it here

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self.entries

    def find(self, key: BlockKey, token_ids: Sequence[int]) -> TierBlock | None:
        """The block under key if it holds exactly these tokens."""
        block = self.entries.get(key)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def touch(self, key: BlockKey) -> None:
        """Most recently used now (if still held: an offload may have pushed it out)."""
        if key in self.entries:
            self.entries.move_to_end(key)

    def insert(self, key: BlockKey, block: TierBlock) -> list[tuple[BlockKey, TierBlock]]:
        """Hold a block (most recently used); returns the blocks pushed out to make room."""
        self.entries[key] = block
        self.entries.move_to_end(key)
        return self._shrink()

    def remove(self, key: BlockKey) -> None:
        self.entries.pop(key, None)

    def park(self, num_blocks: int) -> list[tuple[BlockKey, TierBlock]]:
        """Room for swapped-out blocks: cached blocks pushed out as needed (returned)."""
        self.num_parked += num_blocks
        return self._shrink()

    def unpark(self, num_blocks: int) -> None:
        self.num_parked = max(0, self.num_parked - num_blocks)

    def pin(self, key: BlockKey) -> None:
        """Keep key here (not evicted) until unpinned: a waiting request will fetch it."""
        self.pinned[key] = self.pinned.get(key, 0) + 1

    def unpin(self, key: BlockKey) -> None:
        n = self.pinned.pop(key, 0) - 1
        if n > 0:
            self.pinned[key] = n

    def _shrink(self) -> list[tuple[BlockKey, TierBlock]]:
        """The least recently used unpinned blocks, pushed out until the tier fits."""
        excess = len(self.entries) + self.num_parked - self.capacity_blocks
        victims: list[BlockKey] = []
        for key in self.entries:
            if len(victims) >= excess:
                break
            if key not in self.pinned:
                victims.append(key)
        return [(key, self.entries.pop(key)) for key in victims]


REDIS = "redis"
MISSING, UNREACHABLE = "missing", "unreachable"  # a Redis read's answers that are no fault
REDIS_RETRY_S = 2.0  # after "unreachable", Redis is left alone this long
MISSING_TTL_S = 2.0  # a key Redis did not have is not asked for again this long
LOAD_TIMEOUT_S = 5.0  # a request waits at most this long for its blocks to load from disk
MAX_REMEMBERED_DECISIONS = 4096


@dataclass
class _Pending:
    """What this plan moves: device blocks read into the host tier, host copies written into
    device blocks (for whom), host copies to forget once the plan's copies are done, and the
    disk tier's operations in the order they must run (write, read, delete)."""

    offloads: list[tuple[int, BlockKey]] = field(default_factory=list)
    fetches: list[tuple[int, BlockKey, str]] = field(default_factory=list)
    drops: dict[BlockKey, None] = field(default_factory=dict)
    runs: dict[str, tuple[int, int]] = field(default_factory=dict)  # request -> (blocks, start)
    disk_ops: list[DiskOp] = field(default_factory=list)
    redis_ops: list[RedisOp] = field(default_factory=list)


@dataclass(frozen=True)
class DiskOp:
    """write: the host copy under key goes to disk (before the plan's host drops); read: the
    disk entry is loaded into host memory off the step loop; delete: the entry is removed."""

    op: str
    key: BlockKey
    block: TierBlock | None = None  # write: what the entry's metadata records


@dataclass(frozen=True)
class RedisOp:
    """put: device block block_id, cached under key, goes to Redis (write-through); get: read
    this run of keys into host memory, off the step loop."""

    op: str
    keys: tuple[BlockKey, ...]
    block_id: int = -1
    block: TierBlock | None = None


@dataclass(frozen=True)
class TierOps:
    offloads: tuple[tuple[int, BlockKey], ...]  # (device block, key): copy it into the host
    fetches: tuple[tuple[int, BlockKey], ...]  # (device block, key): copy the host's into it
    drops: tuple[BlockKey, ...]  # host copies to forget after the copies above
    disk_ops: tuple[DiskOp, ...] = ()
    redis_ops: tuple[RedisOp, ...] = ()


@dataclass(frozen=True)
class LoadResult:
    """A read from a tier below the host finished (off the step loop): its block is in host
    memory (ok), or its entry was missing, corrupt, truncated or foreign and was dropped."""

    tier: str
    key: BlockKey
    ok: bool
    block: TierBlock | None = None  # what the entry's metadata recorded (ok only)
    num_bytes: int = 0
    seconds: float = 0.0
    reason: str = ""
    rate_sample: tuple[int, float] | None = None  # (bytes, seconds) of one whole read


class LowerTiers:
    """The tiers below the device pool (host RAM, and disk below it), their cost model and
    counters. Blocks the host tier pushes out move down to disk (write-back); a disk hit is
    loaded into the host tier before its request is admitted, then fetched like a host hit."""

    def __init__(self, host: TierIndex, host_rate: TransferRate, prefill: PrefillRate,
                 block_bytes: int, block_size: int, disk: TierIndex | None = None,
                 disk_rate: TransferRate | None = None, redis_rate: TransferRate | None = None,
                 clock=time.monotonic):
        self.host, self.disk = host, disk
        self.rates = {host.name: host_rate}
        self.counters = {host.name: TierCounters()}
        if disk is not None:
            self.rates[disk.name] = disk_rate or TransferRate(1e8)
            self.counters[disk.name] = TierCounters()
        self.redis = redis_rate is not None  # a Redis tier (no index here: it is shared)
        self.redis_down_until = 0.0  # Redis answered "unreachable": not asked before then
        if redis_rate is not None:
            self.rates[REDIS] = redis_rate
            self.counters[REDIS] = TierCounters()
        self.prefill = prefill
        self.block_bytes = block_bytes
        self.block_size = block_size
        self.clock = clock
        self.loading: dict[BlockKey, float] = {}  # disk reads in flight: key -> issued at
        self.pins: dict[str, list[BlockKey]] = {}  # waiting request -> host keys pinned for it
        self._recomputed: set[str] = set()  # waiting requests whose prefetch chose recompute
        self._missing: dict[BlockKey, float] = {}  # Redis said "missing": not asked until then
        self._pending = _Pending()

    # -- blocks leaving the device pool ----------------------------------------------------
    def offload(self, block_id: int, key: BlockKey, block: TierBlock) -> None:
        """A cached device block is handed out again: keep its K/V in the host tier."""
        if key in self.host:
            self.host.touch(key)  # the host still holds the copy it sent up
            return
        self._pending.offloads.append((block_id, key))
        self._pending.drops.pop(key, None)  # pushed out earlier in this plan: back again
        c = self.counters[self.host.name]
        c.num_stored_blocks += 1
        c.num_bytes_in += self.block_bytes
        self._evict_host(self.host.insert(key, block))

    def park(self, num_blocks: int) -> None:
        """A preempted request's blocks are swapped into host memory."""
        self._evict_host(self.host.park(num_blocks))

    def unpark(self, num_blocks: int) -> None:
        self.host.unpark(num_blocks)

    def _evict_host(self, pushed: list[tuple[BlockKey, TierBlock]]) -> None:
        """Blocks the host tier's LRU pushed out: written to disk (if there is one and it
        does not hold them yet), then their host copies forgotten."""
        self.counters[self.host.name].num_evicted_blocks += len(pushed)
        for key, block in pushed:
            if self.disk is not None:
                if key in self.disk:
                    self.disk.touch(key)
                else:
                    c = self.counters[self.disk.name]
                    c.num_stored_blocks += 1
                    c.num_bytes_in += self.block_bytes
                    self._pending.disk_ops.append(DiskOp("write", key, block))
                    for gone, _ in self.disk.insert(key, block):
                        c.num_evicted_blocks += 1
                        self._pending.disk_ops.append(DiskOp("delete", gone))
            self._pending.drops[key] = None

    # -- hits below the device pool --------------------------------------------------------
    def _host_run(self, keys: Sequence[BlockKey], token_ids: Sequence[int]) -> list[TierBlock]:
        bs, found = self.block_size, []
        for i, key in enumerate(keys):
            block = self.host.find(key, token_ids[i * bs:(i + 1) * bs])
            if block is None:
                break
            found.append(block)
        return found

    def match(self, keys: Sequence[BlockKey], token_ids: Sequence[int], start: int
              ) -> list[TierBlock]:
        """The blocks to bring up for a request whose device hits end at token `start`: the
        run of `keys` (its next full blocks, token_ids their tokens) the host tier holds, if
        the cost model says fetching it beats recomputing it; else none."""
        # the expected time saved is counted when the fetch is final (take_ops)
        return self._worth(self.host.name, self._host_run(keys, token_ids), start,
                           count_saved=False) or []

    def prefetch(self, request_id: str, keys: Sequence[BlockKey], token_ids: Sequence[int],
                 start: int) -> bool:
        """For a waiting request whose device hits end at token `start` (keys and token_ids:
        its next full blocks): past the host tier's run, load the run the disk holds, then ask
        Redis for the rest, into the host tier (as much as it has room for), each where the
        cost model says fetching beats recomputing; keep those blocks and the host's run
        pinned there until the request is admitted. True while the request should wait for
        reads in flight (at most LOAD_TIMEOUT_S)."""
        if self.disk is None and not self.redis:
            return False
        now = self.clock()
        if request_id in self.pins:  # reads started earlier: wait while any is in flight
            return any(now - self.loading.get(k, -LOAD_TIMEOUT_S) < LOAD_TIMEOUT_S
                       for k in self.pins[request_id])
        if request_id in self._recomputed:  # decided at an earlier try: not again
            return False
        bs = self.block_size
        first = len(self._host_run(keys, token_ids))
        room = (self.host.capacity_blocks - self.host.num_parked - len(self.host.pinned)
                - sum(1 for k in keys[:first] if k not in self.host.pinned))
        disk_run = []
        for i in range(first, min(len(keys), first + max(0, room))):
            if keys[i] in self.loading:  # another request's read: it will be in the host
                break
            if self.disk is None or self.disk.find(keys[i], token_ids[i * bs:(i + 1) * bs]) \
                    is None:
                break
            disk_run.append(keys[i])
        disk_run = self._worth(self.disk.name if self.disk else "", disk_run, start + first * bs)
        recompute = disk_run is None
        disk_run = disk_run or []
        after = first + len(disk_run)
        redis_run = []
        if self.redis and now >= self.redis_down_until and (after == len(keys) or (
                keys[after] not in self.loading and (self.disk is None or keys[after]
                                                     not in self.disk))):
            for key in keys[after:first + max(0, room)]:
                if key in self.loading or self._missing.get(key, 0.0) > now:
                    break
                redis_run.append(key)
            redis_run = self._worth(REDIS, redis_run, start + after * bs)
            recompute = recompute or redis_run is None
            redis_run = redis_run or []
        if not disk_run and not redis_run:
            if recompute:
                self._recomputed.add(request_id)
            return False
        self.pins[request_id] = list(keys[:first]) + disk_run + redis_run
        for key in self.pins[request_id]:
            self.host.pin(key)
        for key in disk_run:
            self.loading[key] = now
            self.disk.touch(key)
            self._pending.disk_ops.append(DiskOp("read", key))
        if redis_run:
            for key in redis_run:
                self.loading[key] = now
            self._pending.redis_ops.append(RedisOp("get", tuple(redis_run)))
        return True

    def _worth(self, tier: str, run: list, start: int, count_saved: bool = True) -> list | None:
        """The run (blocks or keys that follow `start` cached tokens), if the cost model says
        fetching it from `tier` beats recomputing it; None if it chose recompute; [] for an
        empty run. The decision is counted."""
        if not run:
            return []
        decision = self.decide(tier, len(run), start)
        c = self.counters[tier]
        if tier != REDIS:  # Redis's hits are known when its answers arrive
            c.num_hit_blocks += len(run)
        if not decision.fetch:
            c.num_recompute_decisions += 1
            c.num_recomputed_blocks += len(run)
            return None
        c.num_fetch_decisions += 1
        if count_saved:
            c.expected_saved_s += decision.recompute_s - decision.fetch_s
        return run

    def publish(self, block_id: int, key: BlockKey, block: TierBlock) -> None:
        """A block the pool has just cached: put it in Redis now (write-through), so other
        processes can fetch it at once."""
        if self.redis and self.clock() >= self.redis_down_until:
            c = self.counters[REDIS]
            c.num_stored_blocks += 1
            c.num_bytes_in += self.block_bytes
            self._pending.redis_ops.append(RedisOp("put", (key,), block_id, block))

    def unpin(self, request_id: str) -> None:
        """The request was admitted (its blocks are on the device now) or ended."""
        self._recomputed.discard(request_id)
        for key in self.pins.pop(request_id, ()):
            self.host.unpin(key)

    def loaded(self, results: Sequence[LoadResult]) -> None:
        """Reads from below the host finished: good blocks join the host tier (their request
        fetches them from there), refused entries leave the disk tier and are recomputed."""
        for r in results:
            self.loading.pop(r.key, None)
            c = self.counters[r.tier]
            if r.tier == REDIS and not r.ok and r.reason in (MISSING, UNREACHABLE):
                if r.reason == UNREACHABLE:
                    self.redis_down_until = self.clock() + REDIS_RETRY_S
                else:  # not asked for again for a while (a request that comes back, others)
                    if len(self._missing) >= MAX_REMEMBERED_DECISIONS:
                        self._missing.clear()
                    self._missing[r.key] = self.clock() + MISSING_TTL_S
                continue  # nobody has computed it (or Redis is away): recomputed
            if r.tier == REDIS and r.ok:
                c.num_hit_blocks += 1
            if not r.ok:
                c.num_rejected_entries += 1
                if self.disk is not None and r.tier == self.disk.name and r.key in self.disk:
                    self.disk.remove(r.key)
                    self._pending.disk_ops.append(DiskOp("delete", r.key))
                continue
            if r.rate_sample is not None:
                self.rates[r.tier].observe(*r.rate_sample)
            c.num_fetched_blocks += 1
            c.num_bytes_out += r.num_bytes
            self._pending.drops.pop(r.key, None)
            self._evict_host(self.host.insert(r.key, r.block))

    def decide(self, tier: str, num_blocks: int, start: int) -> Decision:
        return decide(self.rates[tier], self.prefill, num_blocks * self.block_bytes,
                      num_blocks * self.block_size, start)

    def fetch_run(self, request_id: str, blocks: Sequence[tuple[int, BlockKey]],
                  start: int) -> None:
        """Copy the host's blocks into these device blocks (allocated for them), a run that
        follows `start` cached tokens of the request."""
        for block_id, key in blocks:
            self.host.touch(key)
            self._pending.fetches.append((block_id, key, request_id))
        self._pending.runs[request_id] = (len(blocks), start)

    def cancel(self, request_id: str) -> list[int]:
        """Withdraw this plan's fetches for a request whose admission failed; returns their
        device blocks (their K/V will never arrive)."""
        self.unpin(request_id)
        p = self._pending
        mine = [block_id for block_id, _, rid in p.fetches if rid == request_id]
        if mine:
            p.fetches = [f for f in p.fetches if f[2] != request_id]
        p.runs.pop(request_id, None)
        return mine

    def take_ops(self) -> TierOps:
        """The plan's moves, final: its fetches are counted now."""
        p, self._pending = self._pending, _Pending()
        c = self.counters[self.host.name]
        for num_blocks, start in p.runs.values():
            d = self.decide(self.host.name, num_blocks, start)
            c.num_fetched_blocks += num_blocks
            c.num_bytes_out += num_blocks * self.block_bytes
            c.expected_saved_s += d.recompute_s - d.fetch_s
        return TierOps(tuple(p.offloads), tuple((b, k) for b, k, _ in p.fetches),
                       tuple(p.drops), tuple(p.disk_ops), tuple(p.redis_ops))

    # -- moving everything down (operators, labs) ------------------------------------------
    def demote_host(self, drop: bool) -> int:
        """Every unpinned block of the host tier leaves it: down to the disk (as its LRU would
        send it) or, with drop, forgotten. Returns how many left."""
        keys = [k for k in self.host.entries if k not in self.host.pinned]
        pushed = [(k, self.host.entries.pop(k)) for k in keys]
        if drop:
            for key, _ in pushed:
                self._pending.drops[key] = None
        else:
            self._evict_host(pushed)
        return len(pushed)

    def forget_disk(self) -> int:
        """Every disk entry is deleted (its files too)."""
        if self.disk is None:
            return 0
        keys = list(self.disk.entries)
        for key in keys:
            self.disk.remove(key)
            self._pending.disk_ops.append(DiskOp("delete", key))
        return len(keys)

    # -- measurements ----------------------------------------------------------------------
    def observe_transfer(self, tier: str, num_bytes: int, seconds: float) -> None:
        self.rates[tier].observe(num_bytes, seconds)

    def snapshots(self) -> tuple[TierSnapshot, ...]:
        tiers = (self.host,) if self.disk is None else (self.host, self.disk)
        out = [TierSnapshot(t.name, t.capacity_blocks, len(t), t.num_parked,
                            self.rates[t.name].bytes_per_s, self.rates[t.name].latency_s,
                            TierCounters(**vars(self.counters[t.name]))) for t in tiers]
        if self.redis:  # shared: what it holds is Redis's to say
            out.append(TierSnapshot(REDIS, 0, 0, 0, self.rates[REDIS].bytes_per_s,
                                    self.rates[REDIS].latency_s,
                                    TierCounters(**vars(self.counters[REDIS]))))
        return tuple(out)
