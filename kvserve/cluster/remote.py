"""The engine the ingress's HTTP layer talks to: what server/ uses of an AsyncLLMEngine, done by
engine replicas through a Ray Serve deployment handle. The endpoints, their checks, errors,
streaming, API keys and metrics are server/'s own code, unchanged: only the engine is remote.

A submission becomes one generate call, placed by the deployment's request router from the
prompt's block keys (RouteInfo). The waiting-queue limits (--max-queue, per tenant) hold for the
whole cluster here: a sequence counts as waiting until its first output comes back.

A replica that dies (or shuts down) before a request's first output: the request goes to another
replica, up to MAX_ATTEMPTS times. After its first output (tokens may have reached the client):
every unfinished sequence of it ends with an error output (an SSE error event, or a 500).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from kvserve.cluster.prefix_view import route_digests
from kvserve.cluster.replica import Hello, ReplicaDescription
from kvserve.cluster.routing import ROUTING, RouteInfo
from kvserve.engine.admission import Admission
from kvserve.engine.stream import (
    EngineDeadError,
    EngineStats,
    SequenceInput,
    StreamOutput,
    Submission,
    read_outputs,
)
from kvserve.errors import InvalidRequestError
from kvserve.request import SamplingParams, check_text_length

log = logging.getLogger("kvserve.cluster")
MAX_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.5


def _replica_gone_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return (ActorDiedError, ActorUnavailableError, RayActorError)


def _cause(err: BaseException) -> BaseException:
    """The replica's own exception inside Ray's wrapper (RayTaskError)."""
    from ray.exceptions import RayTaskError

    if isinstance(err, RayTaskError) and err.cause is not None:
        return err.cause
    return err


@dataclass
class _Flight:
    """One submission on its way: the sequences still running, and their last outputs."""

    seqs: list[SequenceInput]
    sink: asyncio.Queue
    live: set[str]
    last: dict[str, StreamOutput] = field(default_factory=dict)
    task: asyncio.Task | None = None
    replica: str | None = None
    queued: set[str] = field(default_factory=set)  # counted by the admission: no output yet
    delivered: bool = False  # some output reached the reader


class RemoteEngine:
    def __init__(self, handle, info: ReplicaDescription, max_queue: int | None = None,
                 max_queue_per_tenant: int | None = None):
        self._handle = handle
        self.info = info
        self.admission = Admission(max_queue, max_queue_per_tenant)
        self.dead = False
        self._flights: dict[str, _Flight] = {}  # request id -> its submission's flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_retries = 0
        self.num_failed_midstream = 0

    # -- what callers may read -------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.info.tokenizer

    @property
    def model_name(self) -> str:
        return self.info.model_name

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def max_output_tokens(self) -> int | None:
        return self.info.max_output_tokens

    @property
    def device(self) -> str:
        return self.info.device

    @property
    def kv_cache_dtype(self) -> str:
        return self.info.kv_cache_dtype

    @property
    def kv_quant_check(self):
        return self.info.kv_quant_check

    @property
    def weights_description(self) -> str:
        return self.info.weights_description

    @property
    def load_time_s(self) -> float:
        return self.info.load_time_s

    @property
    def stats(self) -> EngineStats:
        """The replicas' last reports, summed (no KV snapshot: /metrics has one per replica)."""
        with ROUTING.lock:
            reports = list(ROUTING.stats.values())
        by_tenant: dict[str | None, int] = {}
        for r in reports:
            for tenant, n in r.get("waiting_by_tenant", ()):
                by_tenant[tenant] = by_tenant.get(tenant, 0) + n
        return EngineStats(
            num_running=sum(r.get("num_running", 0) for r in reports),
            num_waiting=sum(r.get("num_waiting", 0) for r in reports),
            waiting_by_tenant=tuple(by_tenant.items()),
            num_steps=sum(r.get("num_steps", 0) for r in reports),
            num_step_errors=sum(r.get("num_step_errors", 0) for r in reports))

    # -- life cycle ----------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()

    def stop_accepting(self) -> None:
        self.dead = True

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._flights:
                return True
            time.sleep(0.05)
        return False

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """End what is still in flight: its readers get EngineDeadError (an error event and
        [DONE], or a 503), its replicas' streams are cancelled."""
        self.dead = True
        if self._loop is None or self._loop.is_closed():
            return

        def end_all() -> None:
            for flight in {id(f): f for f in self._flights.values()}.values():
                if flight.live:
                    flight.live.clear()
                    flight.sink.put_nowait(EngineDeadError("the server is shutting down"))
                if flight.task is not None:
                    flight.task.cancel()

        self._loop.call_soon_threadsafe(end_all)

    # -- the caller's side ---------------------------------------------------------------------
    def validate(self, prompt: str | Sequence[int], params: SamplingParams) -> list[int]:
        """Tokenized and checked by a replica (blocking: the server calls it in a thread)."""
        answer = self._handle.validate.remote(prompt, params).result()
        if isinstance(answer, str):
            raise InvalidRequestError(answer)
        return answer

    def check_text_length(self, text: str) -> None:
        check_text_length(text, self.max_model_len, self.tokenizer.max_token_bytes)

    def check_queue(self, num_new: int, tenant: str | None = None) -> None:
        """The cluster's queue limits: every sequence the ingress sent that has no output yet
        counts as waiting (the replicas' own reports lag by a report period)."""
        self.admission.check(num_new, tenant, EngineStats())

    def submit(self, seqs: Sequence[SequenceInput]) -> Submission:
        if self.dead:
            raise EngineDeadError("the server is shutting down")
        sink: asyncio.Queue = asyncio.Queue()
        ids = {q.request_id for q in seqs}
        flight = _Flight(list(seqs), sink, set(ids), queued=set(ids))
        for q in seqs:
            self.admission.submitted(q.tenant, 1)
            self._flights[q.request_id] = flight
        flight.task = asyncio.get_running_loop().create_task(self._fly(flight))
        flight.task.add_done_callback(lambda _: self._landed(flight))
        return Submission(sink, set(ids))

    def abort(self, request_id: str) -> None:
        flight = self._flights.get(request_id)
        if flight is None or request_id not in flight.live:
            return  # finished (the server aborts every sequence of a response at its end)
        flight.live.discard(request_id)
        if not flight.live and flight.task is not None:
            flight.task.cancel()  # the replica's stream is cancelled: it aborts what runs

    def _landed(self, flight: _Flight) -> None:
        """A flight's task ended (finished, failed or cancelled, even before it ran): nothing
        of it stays counted or tracked."""
        for q in flight.seqs:
            if q.request_id in flight.queued:
                self.admission.taken(q.tenant)
            self._flights.pop(q.request_id, None)
        flight.queued.clear()
        ROUTING.forget(flight.seqs[0].request_id, keys_too=not flight.delivered)

    def outputs(self, submission: Submission) -> AsyncIterator[StreamOutput]:
        return read_outputs(submission, self.abort)

    # -- one submission's life -----------------------------------------------------------------
    def _route(self, flight: _Flight) -> RouteInfo:
        q = flight.seqs[0]
        info = self.info
        cacheable = info.prefix_caching and not any(
            s.params.prompt_logprobs is not None for s in flight.seqs)  # those compute all
        digests = route_digests(info.model_key, q.cache_salt, q.token_ids, info.block_size) \
            if cacheable else []
        return RouteInfo(q.request_id, tuple(digests), info.block_size, len(flight.seqs))

    async def _fly(self, flight: _Flight) -> None:
        route = self._route(flight)
        gone = _replica_gone_errors()
        for attempt in range(MAX_ATTEMPTS):
            call = self._handle.options(stream=True).generate.remote(route, flight.seqs)
            try:
                async for item in call:
                    if isinstance(item, Hello):
                        flight.replica = item.replica
                        continue
                    if not flight.delivered:
                        ROUTING.prefilled(route.route_id, flight.replica or "",
                                          item.num_cached_tokens)
                        flight.delivered = True
                    self._deliver(flight, item)
                if flight.live:  # the stream ended short of some sequence's end
                    self._fail(flight, RuntimeError("the replica's stream ended early"))
                return
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as err:
                call.cancel()  # if the replica is still there, it aborts what it runs
                cause = _cause(err)
                retryable = isinstance(err, gone) or isinstance(cause, EngineDeadError)
                if flight.delivered or not retryable or self.dead \
                        or attempt == MAX_ATTEMPTS - 1:
                    self._fail(flight, cause)
                    return
                self.num_retries += 1
                log.warning("replica %s failed before the first output of %s (%s); "
                            "retrying on another replica", flight.replica, route.route_id,
                            type(cause).__name__)
                if flight.replica is not None:
                    route = dataclasses.replace(route, avoid=(*route.avoid, flight.replica))
                await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))

    def _deliver(self, flight: _Flight, out: StreamOutput) -> None:
        flight.last[out.request_id] = out
        if out.request_id in flight.queued:  # its first output: no longer waiting
            flight.queued.discard(out.request_id)
            self.admission.taken(flight.seqs[0].tenant)
        if out.finished:
            flight.live.discard(out.request_id)
            self.admission.finished(time.monotonic())
        flight.sink.put_nowait(out)

    def _fail(self, flight: _Flight, cause: BaseException) -> None:
        """End every unfinished sequence with an error output naming what happened."""
        midstream = flight.delivered
        if midstream:
            self.num_failed_midstream += 1
        if isinstance(cause, EngineDeadError) and not midstream:
            flight.live.clear()
            flight.sink.put_nowait(cause)  # the server's 503 / error event
            return
        what = f"replica {flight.replica} failed: {type(cause).__name__}: {cause}"
        log.error("%s (request %s)", what, flight.seqs[0].request_id)
        now = time.monotonic()
        for q in flight.seqs:
            if q.request_id not in flight.live:
                continue
            last = flight.last.get(q.request_id)
            flight.sink.put_nowait(StreamOutput(
                request_id=q.request_id, text="", token_ids=(), logprobs=None, finished=True,
                finish_reason="abort", stop_reason=None, num_prompt_tokens=len(q.token_ids),
                num_cached_tokens=last.num_cached_tokens if last else 0,
                num_output_tokens=last.num_output_tokens if last else 0, time=now,
                arrival_time=last.arrival_time if last else now, error=what[:1000]))
        flight.live.clear()
