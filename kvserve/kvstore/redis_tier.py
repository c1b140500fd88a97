"""The Redis tier's bytes: cached blocks as entries (entry.py) in a Redis server that several
kvserve processes share, written and read by one worker thread (redis-py, the official client),
so that the step loop never waits on the network.

Keys are `kvserve:<digest of the model identity>:<block key>`: the block key carries the tenant
salt and the identity carries model, dtype, KV format and window, so processes of another model,
format or tenant never meet an entry they could use; an entry is still checked (metadata and
checksum) before use, and a bad one is deleted. Capacity and eviction are Redis's own (set
`maxmemory` and `maxmemory-policy allkeys-lru` on the server). When Redis is down or
unreachable every read answers "unreachable" at once, puts are dropped, one warning is logged,
and redis-py reconnects on a later command once it is back.
"""

from __future__ import annotations

import hashlib
import logging
import time

import redis
import torch

from kvserve.kvstore.disk import TierLoad, TierWorker
from kvserve.kvstore.entry import EntryError, EntryMeta, decode, encode

log = logging.getLogger("kvserve.offload")
UNREACHABLE = "unreachable"
MISSING = "missing"


class RedisTier(TierWorker):
    name = "redis"

    def __init__(self, url: str, identity: str, layout: str, timeout_s: float = 1.0):
        self.identity, self.layout = identity, layout
        self.prefix = f"kvserve:{hashlib.sha256(identity.encode()).hexdigest()[:16]}:"
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self.url = url
        self._down = False
        super().__init__()

    def redis_key(self, key: bytes) -> str:
        return self.prefix + key.hex()

    def put(self, key: bytes, token_ids: tuple[int, ...], tenant: str | None,
            parts: dict[str, torch.Tensor]) -> None:
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

    def handle(self, op: str, arg, parts) -> None:
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
        seconds = (time.perf_counter() - t0) / max(1, len(keys))
        out = []
        for key, data in zip(keys, values):
            if data is None:
                out.append(TierLoad(self.name, key, False, reason=MISSING))
                continue
            try:
                meta, got = decode(data, key, self.identity, self.layout)
            except EntryError as err:
                self.client.delete(self.redis_key(key))
                out.append(TierLoad(self.name, key, False, reason=str(err)))
                continue
            out.append(TierLoad(self.name, key, True, meta.token_ids, meta.tenant, got,
                                len(data), seconds))
        return out

    def _unreachable(self, err: Exception) -> None:
        if not self._down:
            log.warning("redis tier: %s unreachable (%s); blocks are recomputed until it is "
                        "back", self.url, err)
            self._down = True

    def _up(self) -> None:
        if self._down:
            log.warning("redis tier: %s reachable again", self.url)
            self._down = False
