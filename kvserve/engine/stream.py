"""What crosses between the async engine's thread and its callers: sequences in, StreamOutputs
and EngineStats out (all immutable), and the errors a caller can get. No engine logic here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kvserve.errors import KVServeError
from kvserve.kvcache.snapshot import CacheSnapshot
from kvserve.request import PromptLogprobs, SamplingParams


class EngineDeadError(KVServeError):
    """The engine loop has stopped (shutdown): no new requests are taken."""


class QueueFullError(KVServeError):
    """The waiting queue is at --max-queue: try again later."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class StreamOutput:
    """What one step added to one sequence, plus the totals a response needs at the end."""

    request_id: str
    text: str  # new text (stable: never retracted)
    token_ids: tuple[int, ...]  # new tokens
    logprobs: tuple[tuple[float, dict[int, float]], ...] | None  # for the new tokens
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    time: float  # time.monotonic() when the step ended
    arrival_time: float
    prompt_logprobs: PromptLogprobs | None = None  # on the first output, when asked for
    error: str | None = None  # the step failed: the request ended without finishing


@dataclass(frozen=True)
class EngineStats:
    """What the engine thread publishes after every step (one reference swap: readers always
    get a whole, consistent value): queue lengths, step counts and the KV cache snapshot."""

    num_running: int = 0
    num_waiting: int = 0
    waiting_by_tenant: tuple[tuple[str | None, int], ...] = ()  # (tenant, sequences waiting)
    num_steps: int = 0
    num_step_errors: int = 0
    kv: CacheSnapshot | None = None  # None until the engine thread first publishes


@dataclass(frozen=True)
class SequenceInput:
    """One sequence to generate: a prompt already tokenized and checked (see validate)."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    prompt_text: str | None = None
    cache_salt: str | None = None
    tenant: str | None = None  # whose turn it waits for (fair scheduling), and whose queue


@dataclass(frozen=True)
class Submission:
    sink: asyncio.Queue
    request_ids: set[str]


async def read_outputs(submission: Submission,
                       abort: Callable[[str], None]) -> AsyncIterator[StreamOutput]:
    """A submission's outputs as they come, until every sequence has finished; an exception in
    the sink is raised. Leaving early (a client that disconnects, a cancelled task) or a refused
    sequence calls abort for every sequence still running."""
    unfinished = set(submission.request_ids)
    try:
        while unfinished:
            out = await submission.sink.get()
            if isinstance(out, BaseException):
                raise out
            if out.finished:
                unfinished.discard(out.request_id)
            yield out
    finally:
        for request_id in unfinished:
            abort(request_id)
