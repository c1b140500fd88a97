"""Builds the tiers below the paged pool and measures, at start-up, what the cost model starts
from: how fast this machine moves a block to each tier and back, and how fast this model
prefills (a real forward of PREFILL_TOKENS tokens in the engine's KV format).
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from kvserve.config import EngineConfig
from kvserve.errors import ConfigError
from kvserve.kvcache.costs import PrefillRate, TransferRate, attention_ratio
from kvserve.kvcache.layout import KVLayout
from kvserve.kvcache.tiers import LowerTiers, TierBlock, TierIndex
from kvserve.kvstore.disk import DiskStore, DiskTier
from kvserve.kvstore.entry import EntryMeta
from kvserve.kvstore.host import HostBlockStore
from kvserve.kvstore.paged import PagedKVStore
from kvserve.model.attention.paged import PagedAttention
from kvserve.model.llama import LlamaModel
from kvserve.runner.input_builder import InputBuilder
from kvserve.scheduler.plan import ScheduledSeq, StepPlan

log = logging.getLogger("kvserve.offload")
PREFILL_TOKENS = 128
PROBE_BLOCKS = 8  # blocks per probe copy (and 1: the latency)


def build_lower_tiers(config: EngineConfig, model: LlamaModel, store: PagedKVStore,
                      identity: str) -> tuple[LowerTiers, DiskTier | None, object | None]:
    """The host tier (and the disk tier below it, with what an earlier process left there),
    their measured rates and the measured prefill rate. identity: what made the K/V (model
    files, dtype, KV format and window): disk entries are kept and read under it alone."""
    layout = store.layout
    host = TierIndex("host", config.offload.cpu_offload_bytes // layout.bytes_per_block)
    spec = model.spec
    per_layer = (spec.hidden_size * (2 * spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
                 + 3 * spec.hidden_size * spec.intermediate_size)
    prefill = PrefillRate(0.0, attention_ratio(spec.num_layers, spec.num_heads, spec.head_dim,
                                               spec.num_layers * per_layer))
    prefill.per_token_s = measure_prefill_s(model, layout) / prefill.work(PREFILL_TOKENS, 0)
    parts = {name: ((t.shape[0], 1, *t.shape[2:]), t.dtype) for name, t in store.parts.items()}
    disk, disk_index, disk_rate = None, None, None
    if config.offload.disk_offload_dir is not None:
        root = config.offload.disk_offload_dir
        try:
            disk_store = DiskStore(root, identity, layout_description(store), parts)
            disk_rate = measure_disk_rate(disk_store, store)
            scanned = disk_store.scan()  # a warm start: oldest first, so LRU order holds
        except OSError as err:
            raise ConfigError(f"disk_offload_dir {root!r} cannot be used: {err}") from None
        disk = DiskTier(disk_store)
        disk_index = TierIndex("disk", config.offload.disk_offload_bytes // layout.bytes_per_block)
        for meta in scanned:
            for gone, _ in disk_index.insert(meta.key, TierBlock(meta.token_ids, meta.tenant)):
                disk_store.delete(gone)
    redis, redis_rate = None, None
    if config.offload.redis_url is not None:
        redis, redis_rate = connect_redis(config.offload.redis_url, identity,
                                          layout_description(store), parts)
    lower = LowerTiers(host, measure_host_rate(store), prefill, layout.bytes_per_block,
                       layout.block_size, disk_index, disk_rate, redis_rate)
    if redis is not None and redis_rate.latency_s < 0:  # unreachable at start-up
        lower.redis_down_until = time.monotonic() + 2.0
        redis_rate.latency_s = 1e-3
    return lower, disk, redis


def connect_redis(url: str, identity: str, layout: str, parts: dict):
    """The Redis tier and its measured rate (a round trip of a probe value). Unreachable now:
    one warning, a nominal rate marked by a negative latency, and the tier retried later."""
    try:
        import redis as redis_py

        from kvserve.kvstore.redis_tier import RedisTier
    except ImportError:
        raise ConfigError("redis_url needs the redis package: pip install 'kvserve[offload]'"
                          ) from None
    tier = RedisTier(url, identity, layout, parts)
    try:
        round_trip = statistics.median(tier.probe() for _ in range(3))
    except redis_py.RedisError as err:
        log.warning("redis tier: %s unreachable at start-up (%s); blocks are recomputed until "
                    "it is back", url, err)
        return tier, TransferRate(1e8, -1.0)
    # a block costs the round trip plus its bytes at loopback-or-network speed, taken as the
    # probe's 1 KiB round trip for latency and 1 GB/s until real reads say otherwise
    return tier, TransferRate(1e9, round_trip)


def layout_description(store: PagedKVStore) -> str:
    """What a block's entry must match to be read into this pool: block size and each part's
    shape and dtype."""
    return f"block_size={store.layout.block_size};" + ";".join(
        f"{name}:{tuple(t.shape[:1]) + tuple(t.shape[2:])}:{t.dtype}"
        for name, t in sorted(store.parts.items()))


def measure_disk_rate(disk: DiskStore, store: PagedKVStore) -> TransferRate:
    """A probe entry of one real block written and read back (the read is what fetching
    costs; the page cache answers it as it will answer recent entries)."""
    parts = store.read_blocks((0,))
    key = b"\0" * 32
    runs = []
    for _ in range(3):
        disk.write(EntryMeta(key, (), None), parts)
        t0 = time.perf_counter()
        _, _, num_bytes = disk.read(key)
        runs.append(time.perf_counter() - t0)
    disk.delete(key)
    return TransferRate(num_bytes / statistics.median(runs))


def measure_prefill_s(model: LlamaModel, layout: KVLayout) -> float:
    """Seconds of one prefill of PREFILL_TOKENS tokens from an empty cache (after a warm-up),
    through a scratch store of the engine's format."""
    num_blocks = layout.num_blocks_for_tokens(PREFILL_TOKENS)
    store = PagedKVStore(layout, num_blocks, model.device)
    attention = PagedAttention(store)
    inputs = InputBuilder(model.device, layout.block_size)
    ids = tuple((i * 7919) % model.spec.vocab_size for i in range(PREFILL_TOKENS))
    times = []
    for run in range(2):
        plan = StepPlan((ScheduledSeq(f"probe{run}", ids, 0, True, tuple(range(num_blocks))),))
        step = inputs.build(plan)
        attention.prepare(step.meta)
        t0 = time.perf_counter()
        model.forward(step.input_ids, step.positions, attention, step.meta,
                      torch.tensor([PREFILL_TOKENS - 1], device=model.device))
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        times.append(time.perf_counter() - t0)
        attention.release(f"probe{run}")
    return times[-1]


def measure_host_rate(store: PagedKVStore) -> TransferRate:
    """Copies of real pool blocks (empty at start-up) to host memory and back, as the host tier
    makes them: a batch of one block (the latency) and of PROBE_BLOCKS (the bandwidth)."""
    host = HostBlockStore(pin_memory=store.device.type == "cuda")
    n = min(PROBE_BLOCKS, store.num_blocks)
    seconds = {}
    for count in (1, n):
        ids, keys = tuple(range(count)), tuple(range(count))
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            host.keep(keys, store.read_blocks(ids))
            store.write_blocks(ids, host.copy(keys))
            if store.device.type == "cuda":
                torch.cuda.synchronize(store.device)
            runs.append((time.perf_counter() - t0) / 2)  # one way
        seconds[count] = statistics.median(runs)
    block = store.layout.bytes_per_block
    if n > 1 and seconds[n] > seconds[1]:
        bytes_per_s = (n - 1) * block / (seconds[n] - seconds[1])
    else:
        bytes_per_s = n * block / seconds[n]
    return TransferRate(bytes_per_s, max(0.0, seconds[1] - block / bytes_per_s))
