"""The Redis tier's bytes: cached blocks as entries (entry.py) in a Redis server that several
kvserve processes share, written and read by one worker thread (redis-py, the official client),
so that the step loop never waits on the network.

Keys are `kvserve:<digest of the model identity>:<block key>`: the block key carries the tenant
salt and the identity carries model, dtype, KV format and window, so processes of another model,
format or tenant never meet an entry they could use; an entry is still checked (metadata and
checksum, tensor shapes) before use, and a bad one is deleted. The checksum guards against
damage, not against a writer: anyone who can write to this Redis can write K/V others will
read, so it must be as trusted as the kvserve processes sharing it. Capacity and eviction are
Redis's own (set `maxmemory` and `maxmemory-policy allkeys-lru` on the server). When Redis
fails, it is left alone RETRY_S: reads queued meanwhile answer "unreachable" at once and puts
are dropped (as they are when MAX_PENDING_PUTS wait already); one warning is logged, and
redis-py reconnects on the next command once it is back.
"""

from __future__ import annotations

import hashlib
import logging
import time

import redis
import torch

from kvserve.kvstore.entry import EntryError, EntryMeta, decode, encode
from kvserve.kvstore.tier_worker import TierLoad, TierWorker

log = logging.getLogger("kvserve.offload")
UNREACHABLE = "unreachable"
MISSING = "missing"


MAX_PENDING_PUTS = 256  # puts queued beyond this are dropped (the step loop never waits)
RETRY_S = 2.0  # after a failure, Redis is left alone this long


class RedisTier(TierWorker):
    name = "redis"

    def __init__(self, url: str, identity: str, layout: str,
                 parts: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
                 timeout_s: float = 1.0):
        self.identity, self.layout, self.parts = identity, layout, parts
        self.prefix = f"kvserve:{hashlib.sha256(identity.encode()).hexdigest()[:16]}:"
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self.url = url
        self._down_until = 0.0  # monotonic time before which Redis is not asked again
        self._warned = False
        self._pending_puts = 0  # queued, not yet run (the worker decrements: a GIL-atomic int)
        self.num_dropped_puts = 0
        super().__init__()

    def redis_key(self, key: bytes) -> str:
        return self.prefix + key.hex()

    def accepting_puts(self) -> bool:
        """Whether a put would be queued now (Redis reachable as far as is known, and the
        queue short): the runner reads a block off the pool only then."""
        if time.monotonic() < self._down_until or self._pending_puts >= MAX_PENDING_PUTS:
            self.num_dropped_puts += 1
            return False
        return True

    def put(self, key: bytes, token_ids: tuple[int, ...], tenant: str | None,
            parts: dict[str, torch.Tensor]) -> None:
        self._pending_puts += 1
        self._jobs.put(("put", EntryMeta(key, tuple(token_ids), tenant), parts))

    def get_run(self, keys: list[bytes]) -> None:
        """Read these blocks (a run of one request's) in one round trip; each answers."""
        self._jobs.put(("get", list(keys), None))

    def probe(self) -> float:
        """Seconds of a round trip with one entry-sized value (start-up), or raises
        redis.RedisError when the server cannot be reached."""
        value = b"\0" * 1024
        t0 = time.perf_counter()
        self.client.set(self.prefix + "probe", value, ex=60)
        self.client.get(self.prefix + "probe")
        return (time.perf_counter() - t0) / 2

    def keys_answered_by(self, job) -> list[bytes]:
        return list(job[1]) if job[0] == "get" else []

    def handle(self, op: str, arg, parts) -> None:
        if op == "put":
            self._pending_puts -= 1
        if time.monotonic() < self._down_until:  # away: answer at once, try nothing
            if op == "get":
                for key in arg:
                    self._done.put(TierLoad(self.name, key, False, reason=UNREACHABLE))
            return
        try:
            if op == "put":
                data = encode(arg, parts, self.identity, self.layout)
                self.client.set(self.redis_key(arg.key), data)
            elif op == "get":
                for load in self._get(arg):
                    self._done.put(load)
            self._up()
        except redis.RedisError as err:
            self._unreachable(err)
            if op == "get":
                for key in arg:
                    self._done.put(TierLoad(self.name, key, False, reason=UNREACHABLE))

    def _get(self, keys: list[bytes]) -> list[TierLoad]:
        t0 = time.perf_counter()
        values = self.client.mget([self.redis_key(k) for k in keys])
        seconds = time.perf_counter() - t0
        sample = (sum(len(v) for v in values if v is not None), seconds)
        out = []
        for key, data in zip(keys, values):
            if data is None:
                out.append(TierLoad(self.name, key, False, reason=MISSING))
                continue
            try:
                meta, got = decode(data, key, self.identity, self.layout, self.parts)
            except EntryError as err:
                self.client.delete(self.redis_key(key))
                out.append(TierLoad(self.name, key, False, reason=str(err)))
                continue
            # the run's one round trip is the cost model's sample, carried by its first answer
            out.append(TierLoad(self.name, key, True, meta.token_ids, meta.tenant, got,
                                len(data), seconds / len(keys), rate_sample=sample))
            sample = None
        return out

    def _unreachable(self, err: Exception) -> None:
        self._down_until = time.monotonic() + RETRY_S
        if not self._warned:
            log.warning("redis tier: %s unreachable (%s); blocks are recomputed until it is "
                        "back", self.url, err)
            self._warned = True

    def _up(self) -> None:
        if self._warned:
            log.warning("redis tier: %s reachable again", self.url)
            self._warned = False
