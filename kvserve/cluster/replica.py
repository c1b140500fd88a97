"""One engine replica of a cluster: an AsyncLLMEngine inside a Ray Serve replica actor.

The ingress (remote.py) calls it through a deployment handle:
- describe(): what the ingress needs to speak for the replicas (tokenizer, limits, block keys);
- validate(prompt, params): the engine's own checks, answered as token ids or the error's text;
- generate(route, seqs): a stream: first a Hello naming this replica, then each StreamOutput.
Ray Serve polls record_routing_stats() (its request-router API) and hands the result to every
router: the digests of the blocks this replica's prefix cache holds, kept from its KV events on
the engine thread, plus the engine's queue and cache numbers for the ingress's /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from kvserve.cluster.prefix_view import ReplicaKeys
from kvserve.cluster.routing import RouteInfo
from kvserve.config import EngineConfig
from kvserve.engine.async_engine import AsyncLLMEngine
from kvserve.engine.stream import SequenceInput, StreamOutput
from kvserve.errors import InvalidRequestError
from kvserve.request import SamplingParams

log = logging.getLogger("kvserve.cluster")


@dataclass(frozen=True)
class Hello:
    """The first item of every generate stream: who took the request."""

    replica: str
    pid: int


@dataclass(frozen=True)
class ReplicaDescription:
    tokenizer: object  # kvserve.model.tokenizer.Tokenizer (pickled with its chat template)
    model_name: str
    model_key: str  # the root of every block key (with the cache salt)
    block_size: int
    prefix_caching: bool
    max_model_len: int
    vocab_size: int
    max_output_tokens: int | None
    device: str
    kv_cache_dtype: str
    kv_quant_check: object
    weights_description: str
    load_time_s: float


class EngineReplica:
    def __init__(self, engine_config: EngineConfig):
        from ray import serve

        self.engine = AsyncLLMEngine.from_config(engine_config)  # queue limits: the ingress's
        self.keys = ReplicaKeys()
        self.engine.follow_kv_events(self.keys.apply)
        self.tag = serve.get_replica_context().replica_id.unique_id
        self._started = False
        log.info("replica %s (pid %d): %s loaded in %.1f s", self.tag, os.getpid(),
                 self.engine.model_name, self.engine.load_time_s)

    def _start(self) -> None:
        if not self._started:  # on the loop that reads the outputs
            self.engine.start(asyncio.get_running_loop())
            self._started = True

    async def describe(self) -> ReplicaDescription:
        e = self.engine
        m = e.engine.block_manager
        return ReplicaDescription(
            tokenizer=e.tokenizer, model_name=e.model_name,
            model_key=m.model_key if m is not None else "",
            block_size=m.block_size if m is not None else 0,
            prefix_caching=m is not None and m.prefix_index is not None,
            max_model_len=e.max_model_len, vocab_size=e.vocab_size,
            max_output_tokens=e.max_output_tokens, device=e.device,
            kv_cache_dtype=e.kv_cache_dtype, kv_quant_check=e.kv_quant_check,
            weights_description=e.weights_description, load_time_s=e.load_time_s)

    async def validate(self, prompt: str | Sequence[int], params: SamplingParams
                       ) -> list[int] | str:
        """The prompt's token ids, or the text of the InvalidRequestError it gets."""
        try:
            return await asyncio.to_thread(self.engine.validate, prompt, params)
        except InvalidRequestError as err:
            return str(err)

    async def generate(self, route: RouteInfo, seqs: list[SequenceInput]
                       ) -> AsyncIterator[Hello | StreamOutput]:
        self._start()
        for q in seqs:  # a grammar compiles here, off the engine thread (cached if validated)
            if q.params.structured_outputs is not None:
                await asyncio.to_thread(self.engine.validate, q.token_ids, q.params)
        submission = self.engine.submit(seqs)
        try:
            yield Hello(self.tag, os.getpid())
            async with contextlib.aclosing(self.engine.outputs(submission)) as outputs:
                async for out in outputs:  # leaving early (cancelled) aborts what still runs
                    yield out
        finally:  # cancelled anywhere (even at the Hello): nothing keeps running
            for request_id in submission.request_ids:
                self.engine.abort(request_id)

    def record_routing_stats(self) -> dict:
        s = self.engine.stats
        kv = s.kv
        pool = kv.pool if kv is not None else None
        prefix = kv.prefix if kv is not None else None
        return {
            "keys": self.keys.packed(), "at": time.time(), "pid": os.getpid(),
            "num_running": s.num_running, "num_waiting": s.num_waiting,
            "waiting_by_tenant": s.waiting_by_tenant, "num_steps": s.num_steps,
            "num_step_errors": s.num_step_errors,
            "kv_usage": pool.usage if pool else 0.0,
            "blocks_used": pool.num_used_blocks if pool else 0,
            "blocks_total": pool.num_blocks if pool else 0,
            "cached_blocks": prefix.num_cached_blocks if prefix else 0,
            "queried_tokens": prefix.num_queried_tokens if prefix else 0,
            "hit_tokens": prefix.num_hit_tokens if prefix else 0,
            "preemptions": kv.num_preemptions if kv is not None else 0,
            "tiers": {t.name: (t.counters.num_hit_blocks, t.counters.num_fetched_blocks,
                               t.counters.num_stored_blocks)
                      for t in (kv.tiers if kv is not None else ())},
        }

    def check_health(self) -> None:
        if self._started and self.engine.dead:
            raise RuntimeError("the engine loop has stopped")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.shutdown()
