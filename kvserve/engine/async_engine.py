"""The async front end of one LLMEngine: many asyncio callers, one engine loop in one thread.

Callers (the HTTP server's handlers) submit requests and read their outputs as async iterators;
a single background thread owns the engine, and each of its steps batches every live request
(no request ever runs a forward pass of its own). The engine thread never shares a mutable
object with the event loop: requests and aborts cross into it through a command queue, and each
step's results cross back as immutable StreamOutputs delivered with call_soon_threadsafe
(stream.py holds those types).

Torch releases the GIL inside its kernels (and ctypes around our C kernels), so the event loop
keeps answering HTTP while a step computes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvserve.config import EngineConfig
from kvserve.engine.admission import Admission
from kvserve.engine.engine import LLMEngine
from kvserve.engine.stream import (
    EngineDeadError,
    EngineStats,
    SequenceInput,
    StreamOutput,
    Submission,
    read_outputs,
)
from kvserve.request import FinishReason, Request, SamplingParams

if TYPE_CHECKING:
    from kvserve.kvcache.events import BlockEvent
    from kvserve.kvcache.snapshot import KVQuality
    from kvserve.model.tokenizer import Tokenizer

log = logging.getLogger("kvserve.engine")
IDLE_WAIT_S = 0.5  # how long the idle loop sleeps between checks for stop


@dataclass
class _Add:
    seq: SequenceInput
    sink: asyncio.Queue


@dataclass
class _Abort:
    request_id: str


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_queue: int | None = None,
                 max_queue_per_tenant: int | None = None):
        self.engine = engine
        self.admission = Admission(max_queue, max_queue_per_tenant)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sinks: dict[str, asyncio.Queue] = {}  # engine thread only
        self._submit_lock = threading.Lock()
        self._stats = EngineStats()
        self.dead = False  # no new requests: shutting down, or the loop stopped
        self._kv_event_sink: Callable[[tuple[BlockEvent, ...]], None] | None = None

    @classmethod
    def from_config(cls, config: EngineConfig, max_queue: int | None = None,
                    max_queue_per_tenant: int | None = None) -> AsyncLLMEngine:
        """Build the engine `config` describes (loads the model: slow) behind an async front
        end; start() it from the event loop that will read its outputs."""
        return cls(LLMEngine(config), max_queue, max_queue_per_tenant)

    # -- what callers may read: fixed once the engine is built, safe from any thread ----------
    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer: encode, decode, apply_chat_template, token_bytes."""
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        """The model's own name, from its files."""
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        """The context length: a prompt plus its output tokens must fit in it."""
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size: token ids lie in [0, vocab_size)."""
        return self.engine.spec.vocab_size

    @property
    def max_output_tokens(self) -> int | None:
        """The most tokens one sequence may generate (None: only the context limits it)."""
        return self.engine.config.scheduler.max_output_tokens

    @property
    def device(self) -> str:
        """Where the model runs ("cpu", "cuda:0", ...)."""
        return str(self.engine.device)

    @property
    def kv_cache_dtype(self) -> str:
        """The format K/V are stored in ("auto" resolved)."""
        return self.engine.kv_cache_dtype

    @property
    def kv_quant_check(self) -> KVQuality | None:
        """The start-up guardrail's measure of a quantized KV format (None for float formats
        or with --kv-quant-check off)."""
        return self.engine.kv_quality

    @property
    def weights_description(self) -> str:
        """How the weights are held and multiplied, and the bytes a decode step reads."""
        return self.engine.model.weights_description()

    @property
    def load_time_s(self) -> float:
        """Seconds building the engine took (reading the weights, sizing the KV cache)."""
        return self.engine.load_time_s

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._publish_stats()
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        """Refuse new submissions (EngineDeadError: 503) while in-flight ones run on."""
        with self._submit_lock:
            self.dead = True

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait (blocking: call it in a thread) until nothing is queued or running, for at
        most timeout_s; True if it got there."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (self._stats.num_running == 0 and self._stats.num_waiting == 0
                    and self.admission.num_pending_total() == 0 and self._commands.empty()):
                return True
            time.sleep(0.05)
        return False

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort whatever is still in flight (its readers get EngineDeadError) and stop the
        loop thread."""
        self.dead = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._thread is None or not self._thread.is_alive():
            self.engine.close()  # the disk tier gets what it does not hold yet

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def follow_kv_events(self, sink: Callable[[tuple[BlockEvent, ...]], None]) -> None:
        """Hand every block event to sink, on the engine thread, after each step that made
        some (a cluster replica keeps the keys it holds this way). Call before start()."""
        self.engine.record_kv_events()
        self._kv_event_sink = sink

    # -- the caller's side (event loop thread) -------------------------------------------------
    def validate(self, prompt: str | Sequence[int], params: SamplingParams) -> list[int]:
        """Tokenize and check a prompt against the context and the limits (read-only: safe
        outside the engine thread). Raises InvalidRequestError naming the problem."""
        token_ids = self.engine.encode_prompt(prompt)
        self.engine.check_fits(len(token_ids), params)
        return token_ids

    def check_text_length(self, text: str) -> None:
        """InvalidRequestError if the text certainly has more tokens than the context, decided
        from its length alone (no tokenizing)."""
        self.engine.check_text_length(text)

    def check_queue(self, num_new: int, tenant: str | None = None) -> None:
        """Raise QueueFullError when num_new more waiting sequences would pass max_queue or the
        tenant's max_queue_per_tenant (call submit() right after, with no await between: the
        check and the submit are then one step of the event loop and no other request can
        slip in)."""
        self.admission.check(num_new, tenant, self._stats)

    def submit(self, seqs: Sequence[SequenceInput]) -> Submission:
        """Queue sequences now (synchronously); read their outputs with outputs()."""
        sink: asyncio.Queue = asyncio.Queue()
        with self._submit_lock:  # the engine thread's final drain takes it too: no lost add
            if self.dead:
                raise EngineDeadError("the server is shutting down")
            for q in seqs:
                self.admission.submitted(q.tenant, 1)
                self._commands.put(_Add(q, sink))
        self._wake.set()
        return Submission(sink, {q.request_id for q in seqs})

    def abort(self, request_id: str) -> None:
        """End a request now and free its blocks (a disconnected client); a no-op if done."""
        with self._submit_lock:
            if not self.dead:
                self._commands.put(_Abort(request_id))
        self._wake.set()

    def outputs(self, submission: Submission) -> AsyncIterator[StreamOutput]:
        """The outputs of submitted sequences (the n samples of some prompts), interleaved as
        the engine makes them, until all finish. Leaving early (a client that disconnects, a
        cancelled task) or a refused sequence aborts every one still running."""
        return read_outputs(submission, self.abort)

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException:  # a bug in the loop itself: fail everyone rather than hang them
            log.exception("engine loop crashed")
            self.dead = True
        finally:
            with self._submit_lock:
                self.dead = True  # nothing is queued after this final drain
            self._drain_commands()
            self._abort_all(EngineDeadError("the server is shutting down" if self._stop.is_set()
                                            else "the engine loop crashed"))

    def _drain_commands(self) -> None:
        handled = False
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            handled = True
            if isinstance(cmd, _Add):
                q = cmd.seq
                self.admission.taken(q.tenant)
                if self._stop.is_set():
                    self._send(cmd.sink, EngineDeadError("the server is shutting down"))
                    continue
                try:
                    self.engine.add_request(q.request_id, q.token_ids, q.params,
                                            prompt_text=q.prompt_text, cache_salt=q.cache_salt,
                                            tenant=q.tenant)
                except Exception as err:  # invalid after all (e.g. a duplicate id)
                    self._send(cmd.sink, err)
                    continue
                self._sinks[q.request_id] = cmd.sink
            else:
                if cmd.request_id in self._sinks:
                    del self._sinks[cmd.request_id]
                    self.engine.abort_request(cmd.request_id)
        if handled:  # a step publishes its own; an idle wake-up with nothing new does not
            self._publish_stats()

    def _step(self) -> None:
        running_before = [r.request_id for r in self.engine.scheduler.running]
        try:
            deltas = self.engine.step()
        except Exception as err:
            self._fail_step(err, running_before)
            return
        now = time.monotonic()
        outputs = []
        for d in deltas:
            r = self.engine.requests.get(d.request_id)
            sink = self._sinks.pop(d.request_id, None) if d.finished else \
                self._sinks.get(d.request_id)
            if r is not None and sink is not None:
                outputs.append((sink, _output(r, d.new_text, d.new_token_ids, now, d.error)))
            if d.finished and r is not None:
                self.engine.pop_finished(d.request_id)
                self.admission.finished(now)
            if d.error is not None:
                self._stats = dataclasses.replace(
                    self._stats, num_step_errors=self._stats.num_step_errors + 1)
        self._stats = dataclasses.replace(self._stats, num_steps=self._stats.num_steps + 1)
        self._publish_stats()
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(_deliver, outputs)

    def _fail_step(self, err: Exception, running_before: list[str]) -> None:
        """A step raised outside the forward pass (the engine isolates failures inside it to
        the request that raised): end the requests it was running (their state is suspect)
        with an error, keep the rest queued, and go on."""
        log.exception("engine step failed; ending the %d request(s) in it", len(running_before))
        self._stats = dataclasses.replace(self._stats,
                                          num_step_errors=self._stats.num_step_errors + 1)
        ids = set(running_before) | {r.request_id for r in self.engine.scheduler.running}
        message = f"engine error: {type(err).__name__}: {err}"
        for request_id in ids:
            self._end(request_id, message)
        self._publish_stats()

    def _end(self, request_id: str, error: str | BaseException) -> None:
        """Abort a request; its reader gets an output carrying the error message (a failed
        step) or the exception itself (shutdown)."""
        sink = self._sinks.pop(request_id, None)
        r = self.engine.requests.get(request_id)
        try:
            self.engine.abort_request(request_id)
        except Exception:  # the state is already broken; the request is gone either way
            log.exception("abort of %s failed", request_id)
        if sink is not None and r is not None:
            self._send(sink, error if isinstance(error, BaseException) else
                       _output(r, "", (), time.monotonic(), error=error))

    def _abort_all(self, error: BaseException) -> None:
        for request_id in list(self._sinks):
            self._end(request_id, error)

    def _send(self, sink: asyncio.Queue, item) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(sink.put_nowait, item)

    def _publish_stats(self) -> None:
        e, old = self.engine, self._stats
        if self._kv_event_sink is not None:
            events = e.drain_kv_events()
            if events:
                self._kv_event_sink(events)
        self._stats = EngineStats(  # one reference swap: readers never see half an update
            num_running=len(e.scheduler.running), num_waiting=e.scheduler.num_waiting,
            waiting_by_tenant=tuple(e.scheduler.waiting.counts_by_tenant().items()),
            num_steps=old.num_steps, num_step_errors=old.num_step_errors,
            kv=e.cache_snapshot())


def _output(r: Request, text: str, token_ids: tuple[int, ...], now: float,
            error: str | None = None) -> StreamOutput:
    finished = r.status.finished or error is not None
    logprobs = None
    if r.params.logprobs is not None and token_ids:
        logprobs = tuple(r.output_logprobs[len(r.output_logprobs) - len(token_ids):])
    first = len(r.output_token_ids) == len(token_ids)  # the first output of this request
    reason = r.finish_reason.value if r.finish_reason else None
    if error is not None:
        reason = FinishReason.ABORT.value
    return StreamOutput(
        request_id=r.request_id, text=text, token_ids=token_ids, logprobs=logprobs,
        finished=finished, finish_reason=reason if finished else None,
        stop_reason=r.stop_reason if finished else None,
        num_prompt_tokens=r.num_prompt_tokens, num_cached_tokens=r.num_cached_tokens or 0,
        num_output_tokens=len(r.output_token_ids), time=now, arrival_time=r.arrival_time,
        prompt_logprobs=(tuple(r.prompt_logprobs)
                         if first and r.params.prompt_logprobs is not None else None),
        error=error)


def _deliver(outputs: list[tuple[asyncio.Queue, StreamOutput]]) -> None:
    for sink, out in outputs:
        sink.put_nowait(out)  # unbounded: never full
