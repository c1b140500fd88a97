"""Reading a submission's outputs: to the end for a JSON response (collect), or as server-sent
events (stream), aborting its sequences however the response ends. Chunk contents are the
endpoints' (completions.py, chat.py).
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from kvserve.engine.stream import EngineDeadError, StreamOutput, Submission
from kvserve.server import protocol as P
from kvserve.server.errors import APIError, error_body
from kvserve.server.middleware import ACCESS
from kvserve.server.responses import ChoiceState, record_access
from kvserve.server.state import ServerState
from kvserve.server.submission import abort

DISCONNECT_POLL_S = 0.25
Render = Callable[[ChoiceState, StreamOutput], list[dict[str, Any]]]


async def json_response(build: Callable[[], BaseModel]) -> Response:
    """A whole response built and serialized in a worker thread: a response with thousands of
    log-probs takes long enough to build that on the event loop it would stall every other
    client."""
    def render() -> bytes:
        return build().model_dump_json().encode()

    return Response(await asyncio.to_thread(render), media_type="application/json")


async def collect(state: ServerState, raw: Request, submission: Submission,
                  choices: dict[str, ChoiceState]) -> bool:
    """Run sequences to the end for a non-streamed response; False if the client went away.
    A client that disconnects meanwhile, or a sequence that fails (raised as a 500), ends them
    all at once (their blocks are freed)."""

    async def run() -> None:
        async with contextlib.aclosing(state.engine.outputs(submission)) as outputs:
            async for out in outputs:
                choices[out.request_id].add(out, state.metrics)
                if out.error is not None:
                    break  # the response is a 500 now: stop the siblings too

    task = asyncio.create_task(run())
    try:
        if not await _finish_unless_disconnected(task, raw):
            return False
    finally:
        if not task.done():
            task.cancel()
        abort(state, submission)
    record_access(access_counts(raw), choices.values())
    for c in choices.values():
        if c.error is not None:
            raise APIError(500, c.error, "server_error", code="engine_error")
    return True


def access_counts(raw: Request) -> dict | None:
    """The dict the access log reads this request's counts from (None: no access log)."""
    return getattr(raw.state, ACCESS, None)


async def _finish_unless_disconnected(task: asyncio.Task, raw: Request) -> bool:
    """Wait for task (raising what it raised), polling for a client that goes away meanwhile:
    then cancel it and return False."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            task.result()
            return True
        if await raw.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False


class SubmissionStream(StreamingResponse):
    """SSE over a submission. However the response ends (finished, client gone before or
    during the stream, a cancelled task), its sequences are aborted when it does: Starlette
    does not close a body iterator it stopped reading, nor one it never started."""

    def __init__(self, events: AsyncIterator[str], state: ServerState, submission: Submission):
        super().__init__(events, media_type="text/event-stream")
        self._events, self._state, self._submission = events, state, submission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            abort(self._state, self._submission)
            with contextlib.suppress(Exception):
                await self._events.aclose()


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"),
                                                                  allow_nan=False)
    return f"data: {data}\n\n"


def stream(state: ServerState, submission: Submission, choices: dict[str, ChoiceState],
           head: list[dict[str, Any]], render: Render,
           tail: Callable[[], dict[str, Any] | None],
           access: dict | None = None) -> SubmissionStream:
    """The SSE stream both endpoints share: `head` chunks, then each output's chunks from
    render(), then tail()'s chunk (the usage) once every sequence has finished, then [DONE]. A
    failed step or a shutdown ends the stream with an error event (and still [DONE])."""

    async def events() -> AsyncIterator[str]:
        for payload in head:
            yield sse(payload)
        try:
            async with contextlib.aclosing(state.engine.outputs(submission)) as outputs:
                async for out in outputs:
                    c = choices[out.request_id]
                    c.add(out, state.metrics)
                    if out.error is not None:
                        yield sse(error_body(out.error, "server_error", code="engine_error"))
                        break
                    for payload in render(c, out):
                        yield sse(payload)
                else:
                    last = tail()
                    if last is not None:
                        yield sse(last)
        except EngineDeadError as err:  # shutting down: this stream ends here
            yield sse(error_body(str(err), "service_unavailable"))
        record_access(access, choices.values())
        yield sse("[DONE]")

    return SubmissionStream(events(), state, submission)


def usage_options(body: P._Sampling) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a streamed request."""
    options = body.stream_options
    if options is None:
        return False, False
    return options.include_usage, options.include_usage and options.continuous_usage_stats


def chunk(request_id: str, object_: str, created: int, model: str, include_usage: bool,
          choice_list: list[dict[str, Any]], usage: P.Usage | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"id": request_id, "object": object_, "created": created,
                               "model": model, "choices": choice_list}
    if include_usage:  # OpenAI: null on every chunk but the last, which has no choices
        # (vLLM's continuous_usage_stats: the usage so far on every chunk)
        payload["usage"] = usage.model_dump() if usage is not None else None
    return payload
