"""The OpenAI-compatible HTTP API (FastAPI) over one AsyncLLMEngine.

The server owns HTTP only: it validates and tokenizes, turns requests into sequences for the
engine, and turns the engine's outputs into OpenAI responses or server-sent events. Every error a
client can cause is answered with an OpenAI-style body, {"error": {"message", "type", "param",
"code"}}, and the right status: 400 invalid, 401 bad key, 404 unknown model or route, 413 body too
large, 429 queue full (with Retry-After), 500 engine error (that request only), 503 shutting down.
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve.config import ServerConfig
from kvserve.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    QueueFullError,
    SequenceInput,
    StreamOutput,
    Submission,
)
from kvserve.engine.llm import derive_seed
from kvserve.errors import InvalidRequestError
from kvserve.request import SamplingParams
from kvserve.server import protocol as P
from kvserve.server.metrics import CONTENT_TYPE, ServerMetrics
from kvserve.server.responses import (
    ChoiceState,
    chat_logprobs,
    completion_logprobs,
    usage_of,
)

log = logging.getLogger("kvserve.server")
DISCONNECT_POLL_S = 0.25
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": P.ErrorResponse, "description": text}
    for status, text in ((400, "invalid request"), (401, "missing or wrong API key"),
                         (404, "unknown model"), (413, "request body too large"),
                         (429, "waiting queue full"), (500, "engine error"),
                         (503, "shutting down"))}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                       param, code)
        self.headers = headers


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.type, err.param, err.code),
                        status_code=err.status, headers=err.headers)


def _field_name(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    if not parts:
        return None
    name = str(parts[0])
    for p in parts[1:]:
        if isinstance(p, int):
            name += f"[{p}]"
        elif not str(p).startswith(("list[", "str", "int", "function-", "union[")):
            name += f".{p}"  # skip pydantic's union-member labels
    return name


def validation_error(err: RequestValidationError) -> APIError:
    errors = err.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    field = _field_name(tuple(first.get("loc", ())))
    if field is None:
        return APIError(400, "the request body must be a JSON object")
    same_field = [e for e in errors if _field_name(tuple(e.get("loc", ())))
                  and str(e["loc"][1:2]) == str(first["loc"][1:2])]
    if first.get("type") == "missing":
        return APIError(400, f"'{field}' is required", param=field)
    if len(same_field) > 1 and field.split(".")[0].split("[")[0] == "prompt":
        if any(e.get("type") in ("string_too_short", "too_short") for e in same_field):
            return APIError(400, "prompt must not be empty (nor hold an empty prompt)",
                            param="prompt")
        return APIError(400, "prompt must be a string, a list of strings, a list of token ids "
                        "or a list of token-id lists", param="prompt")
    return APIError(400, f"'{field}': {first.get('msg', 'invalid value')}", param=field)


@dataclasses.dataclass
class ServerState:
    engine: AsyncLLMEngine
    config: ServerConfig
    model_name: str
    metrics: ServerMetrics
    tenants: dict[str, str]  # api key -> tenant salt

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def max_new_tokens(self) -> int:
        """The largest max_tokens this server takes: the context less one prompt token, or
        the max_output_tokens limit."""
        limit = self.engine.engine.config.scheduler.max_output_tokens
        most = self.max_model_len - 1
        return most if limit is None else min(most, limit)


def tenant_salt(api_key: str) -> str:
    return "tenant:" + hashlib.sha256(api_key.encode()).hexdigest()[:32]


def build_app(engine: AsyncLLMEngine, config: ServerConfig, model_name: str) -> FastAPI:
    state = ServerState(engine, config, model_name,
                        ServerMetrics(lambda: engine.stats, model_name),
                        {key: tenant_salt(key) for key in config.api_keys})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="kvserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API of kvserve, an inference engine whose "
                  "center is the KV cache.")
    app.state.kvserve = state
    if state.tenants:
        bearer = HTTPBearer(auto_error=False, description="one of the server's --api-key values")

        async def tenant(credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                Depends(bearer)]) -> str | None:
            key = credentials.credentials if credentials is not None else None
            if key is None or key not in state.tenants:
                raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer "
                               "KEY')", code="invalid_api_key")
            return state.tenants[key]
    else:  # no keys: the schema declares no security scheme, and none is checked

        async def tenant() -> str | None:
            return None

    app.add_middleware(BodyLimitAndCount, state=state)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError):
        return error_response(validation_error(err))

    @app.exception_handler(InvalidRequestError)
    async def on_invalid(request: Request, err: InvalidRequestError):
        code = "context_length_exceeded" if "max_model_len" in str(err) else None
        return error_response(APIError(400, str(err), param=_param_of(str(err)), code=code))

    @app.exception_handler(QueueFullError)
    async def on_queue_full(request: Request, err: QueueFullError):
        return error_response(APIError(429, str(err), "rate_limit_error", code="queue_full",
                                       headers={"Retry-After": str(err.retry_after_s)}))

    @app.exception_handler(EngineDeadError)
    async def on_dead(request: Request, err: EngineDeadError):
        return error_response(APIError(503, str(err), "service_unavailable"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, err: StarletteHTTPException):
        type_ = "invalid_request_error" if err.status_code < 500 else "server_error"
        message, code = str(err.detail), None
        if err.status_code == 404 and message == "Not Found":
            message = f"{request.method} {request.url.path} is not an endpoint of this server"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif err.status_code == 413:
            code = "request_too_large"
        return error_response(APIError(err.status_code, message, type_, code=code,
                                       headers=getattr(err, "headers", None)))

    @app.exception_handler(Exception)
    async def on_other(request: Request, err: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(err).__name__}",
                                       "server_error"))

    @app.get("/health", response_model=P.Health, responses={503: ERROR_RESPONSES[503]})
    async def health() -> P.Health:
        if engine.dead:
            raise EngineDeadError("the engine loop has stopped")
        return P.Health()

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=P.ModelList,
             responses={401: ERROR_RESPONSES[401]})
    async def models(_: Annotated[str | None, Depends(tenant)]) -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=model_name, created=P.now_s(),
                                             max_model_len=state.max_model_len)])

    stream_doc = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                        "description": "the response, or server-sent events with stream"}}
    errors = {k: v for k, v in ERROR_RESPONSES.items() if k != 503}

    @app.post("/v1/completions", response_model=P.CompletionResponse,
              responses={**stream_doc, **errors})
    async def completions(body: P.CompletionRequest, raw: Request,
                          salt: Annotated[str | None, Depends(tenant)]):
        return await _completions(state, body, raw, salt)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
              responses={**stream_doc, **errors})
    async def chat_completions(body: P.ChatCompletionRequest, raw: Request,
                               salt: Annotated[str | None, Depends(tenant)]):
        return await _chat(state, body, raw, salt)

    _describe_limits(app, state)
    return app


def _describe_limits(app: FastAPI, state: ServerState) -> None:
    """/openapi.json states this server's own limits: the largest max_tokens it can take and
    the vocabulary token ids must fall in."""
    most = state.max_new_tokens
    vocab = state.engine.engine.spec.vocab_size
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base_openapi()
            schemas = schema["components"]["schemas"]
            for model, field in (("CompletionRequest", "max_tokens"),
                                 ("ChatCompletionRequest", "max_tokens"),
                                 ("ChatCompletionRequest", "max_completion_tokens")):
                for option in schemas[model]["properties"][field].get("anyOf", []):
                    if option.get("type") == "integer":
                        option["maximum"] = most
            _cap_token_ids(schemas["CompletionRequest"]["properties"]["prompt"], vocab - 1)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _cap_token_ids(node: Any, largest: int) -> None:
    """Give every integer item (a token id) under node a maximum."""
    if isinstance(node, dict):
        if node.get("type") == "integer" and node.get("minimum") == 0:
            node["maximum"] = largest
        for value in node.values():
            _cap_token_ids(value, largest)
    elif isinstance(node, list):
        for value in node:
            _cap_token_ids(value, largest)


API_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, size: str, limit: int):
        super().__init__(413, f"the request body has {size} bytes, over the server's limit "
                         f"({limit})")


class BodyLimitAndCount:
    """Plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects
    from the handlers): answers 413 to a body over the limit, whether it declares its length
    or comes in chunks, and counts API responses by endpoint and status."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.state.config.max_body_bytes
        path = scope.get("path", "")
        endpoint = path if path in API_PATHS else "other"
        length = dict(scope.get("headers", ())).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            err = BodyTooLarge(length.decode(), limit)
            self.state.metrics.count_response(endpoint, 413)
            return await error_response(APIError(413, str(err.detail),
                                                 code="request_too_large"))(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"more than {limit}", limit)
            return message

        async def counting_send(message):
            if message["type"] == "http.response.start" and path.startswith("/v1/"):
                self.state.metrics.count_response(endpoint, message["status"])
            await send(message)

        return await self.app(scope, limited_receive, counting_send)


def _param_of(message: str) -> str | None:
    """The field an engine-side InvalidRequestError is about: the one to change."""
    if "max_tokens" in message:
        return "max_tokens"
    word = message.split(" ", 1)[0].strip("'(),:")
    known = set(P.CompletionRequest.model_fields) | set(P.ChatCompletionRequest.model_fields)
    return word if word in known else None


# -- turning requests into sequences ---------------------------------------------------------
def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model '{model}' does not exist (this server serves "
                       f"'{state.model_name}')", param="model", code="model_not_found")


def _check_unsupported(body: P._Sampling, **fields: Any) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true",
                       param="stream_options")
    if body.logit_bias:  # type: ignore[attr-defined]
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    for name, ok in fields.items():
        if not ok:
            raise APIError(400, f"{name} is not supported", param=name)


def _salt(tenant: str | None, cache_salt: str | None) -> str | None:
    if tenant is None:
        return cache_salt
    return tenant if cache_salt is None else f"{tenant}/{cache_salt}"


def _sampling(body: P._Sampling, max_tokens: int | None, state: ServerState,
              **extra: Any) -> SamplingParams:
    limit = state.engine.engine.config.scheduler.max_output_tokens
    if max_tokens is None and limit is not None:
        max_tokens = limit  # "as many as allowed" under a max_output_tokens limit
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stop) > 16:
        raise APIError(400, f"stop has {len(stop)} strings; at most 16 are allowed",
                       param="stop")
    return SamplingParams(
        n=body.n, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k in (None, -1) else body.top_k,
        min_p=body.min_p or 0.0, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed, stop=tuple(stop), stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos, max_tokens=max_tokens, min_tokens=body.min_tokens,
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output, **extra)


async def _submit(state: ServerState, request_id: str,
                  prompts: list[tuple[str | None, str | list[int]]], params: SamplingParams,
                  salt: str | None) -> tuple[list[SequenceInput], Submission]:
    """Tokenize and check every prompt (off the event loop), check the queue and submit, all
    or nothing: no await between the queue check and the submit, so no other request can
    take the room in between."""
    checked = []
    for _, prompt in prompts:
        checked.append(await asyncio.to_thread(state.engine.validate, prompt, params))
    seqs = []
    for i, ((text, _), ids) in enumerate(zip(prompts, checked)):
        for j in range(params.n):
            p = params
            if j > 0:  # sample 0 scores the prompt (echo); the others may reuse its blocks
                p = dataclasses.replace(
                    p, prompt_logprobs=None,
                    seed=None if p.seed is None else derive_seed(p.seed, j))
            seqs.append(SequenceInput(f"{request_id}-{i}-{j}", ids, p, text, salt))
    state.engine.check_queue(len(seqs))
    return seqs, state.engine.submit(seqs)


def _abort(state: ServerState, submission: Submission) -> None:
    for request_id in submission.request_ids:
        state.engine.abort(request_id)  # a no-op for finished ones


async def _collect(state: ServerState, raw: Request, submission: Submission,
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
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                task.result()
                break
            if await raw.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return False
    finally:
        if not task.done():
            task.cancel()
        _abort(state, submission)
    for c in choices.values():
        if c.error is not None:
            raise APIError(500, c.error, "server_error", code="engine_error")
    return True


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
            _abort(self._state, self._submission)
            with contextlib.suppress(Exception):
                await self._events.aclose()


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"),
                                                                  allow_nan=False)
    return f"data: {data}\n\n"


async def _completions(state: ServerState, body: P.CompletionRequest, raw: Request,
                       tenant: str | None):
    _check_model(state, body.model)
    _check_unsupported(body, suffix=not body.suffix,
                       best_of=body.best_of is None or body.best_of == body.n)
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be at least 1 (0 is only allowed with echo, to "
                       "score the prompt)", param="max_tokens")
    prompts = _completion_prompts(body.prompt)
    score_only = body.max_tokens == 0
    want_prompt_logprobs = body.echo and body.logprobs is not None
    params = _sampling(body, 1 if score_only else body.max_tokens, state,
                       logprobs=body.logprobs,
                       prompt_logprobs=body.logprobs if want_prompt_logprobs else None)
    if score_only:  # one token is made and dropped: nothing asked of it may fail the request
        params = dataclasses.replace(params, min_tokens=0)
    request_id = P.new_id("cmpl")
    seqs, submission = await _submit(state, request_id, prompts, params,
                                     _salt(tenant, body.cache_salt))
    choices = {s.request_id: ChoiceState(index, prompts[index // params.n][0], s.token_ids,
                                         index % params.n == 0)
               for index, s in enumerate(seqs)}
    created = P.now_s()
    tok = state.tokenizer

    def completion_choice(c: ChoiceState) -> P.CompletionChoice:
        text = (c.prompt_text_or(tok) if body.echo else "") + ("" if score_only else c.text)
        logprobs = None
        if body.logprobs is not None:
            out_ids, out_lps = ([], []) if score_only else (c.token_ids, c.logprobs)
            logprobs = completion_logprobs(tok, out_ids, out_lps, c.prompt_ids,
                                           c.prompt_logprobs if body.echo else None)
        return P.CompletionChoice(index=c.index, text=text, logprobs=logprobs,
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    if not body.stream:
        if not await _collect(state, raw, submission, choices):
            return Response(status_code=499)  # nobody is left to read it
        return P.CompletionResponse(
            id=request_id, created=created, model=state.model_name,
            choices=[completion_choice(c) for c in choices.values()],
            usage=usage_of(choices.values(), score_only))

    include_usage, continuous = _usage_options(body)

    def chunk(c: ChoiceState, text: str, logprobs: P.CompletionLogprobs | None,
              out: StreamOutput | None = None) -> dict[str, Any]:
        finished = out is not None and out.finished
        return _chunk(request_id, "text_completion", created, state.model_name, include_usage, [{
            "index": c.index, "text": text,
            "logprobs": logprobs.model_dump() if logprobs is not None else None,
            "finish_reason": out.finish_reason if finished else None,
            "stop_reason": out.stop_reason if finished else None}],
            usage_of(choices.values(), score_only) if continuous else None)

    def render(c: ChoiceState, out: StreamOutput) -> list[dict[str, Any]]:
        payloads = []
        if body.echo and not c.echoed:  # the prompt is scored once prefill is done
            c.echoed = True
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(tok, [], [], c.prompt_ids, c.prompt_logprobs)
            echo = c.prompt_text_or(tok)
            c.streamed_chars += len(echo)
            payloads.append(chunk(c, echo, lp))
        text = "" if score_only else out.text
        lp = None
        if body.logprobs is not None and not score_only:
            lp = completion_logprobs(tok, out.token_ids, out.logprobs or (),
                                     text_start=c.streamed_chars)
        if text or out.finished or lp is not None:
            c.streamed_chars += len(text)
            payloads.append(chunk(c, text, lp, out))
        return payloads

    def usage_chunk() -> dict[str, Any] | None:
        return _chunk(request_id, "text_completion", created, state.model_name, True, [],
                      usage_of(choices.values(), score_only)) if include_usage else None

    return _stream(state, submission, choices, [], render, usage_chunk)


def _stream(state: ServerState, submission: Submission, choices: dict[str, ChoiceState],
            head: list[dict[str, Any]],
            render: Callable[[ChoiceState, StreamOutput], list[dict[str, Any]]],
            tail: Callable[[], dict[str, Any] | None]) -> SubmissionStream:
    """The SSE stream both endpoints share: `head` chunks, then each output's chunks from
    render(), then tail()'s chunk (the usage) once every sequence has finished, then [DONE]. A
    failed step or a shutdown ends the stream with an error event (and still [DONE])."""

    async def events() -> AsyncIterator[str]:
        for payload in head:
            yield _sse(payload)
        try:
            async with contextlib.aclosing(state.engine.outputs(submission)) as outputs:
                async for out in outputs:
                    c = choices[out.request_id]
                    c.add(out, state.metrics)
                    if out.error is not None:
                        yield _sse(error_body(out.error, "server_error", code="engine_error"))
                        break
                    for payload in render(c, out):
                        yield _sse(payload)
                else:
                    last = tail()
                    if last is not None:
                        yield _sse(last)
        except EngineDeadError as err:  # shutting down: this stream ends here
            yield _sse(error_body(str(err), "service_unavailable"))
        yield _sse("[DONE]")

    return SubmissionStream(events(), state, submission)


def _usage_options(body: P._Sampling) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a streamed request."""
    options = body.stream_options
    if options is None:
        return False, False
    return options.include_usage, options.include_usage and options.continuous_usage_stats


def _chunk(request_id: str, object_: str, created: int, model: str, include_usage: bool,
           choice_list: list[dict[str, Any]], usage: P.Usage | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"id": request_id, "object": object_, "created": created,
                               "model": model, "choices": choice_list}
    if include_usage:  # OpenAI: null on every chunk but the last, which has no choices
        # (vLLM's continuous_usage_stats: the usage so far on every chunk)
        payload["usage"] = usage.model_dump() if usage is not None else None
    return payload


def _completion_prompts(prompt: Any) -> list[tuple[str | None, Any]]:
    """(text or None, what to tokenize) per prompt of a completion request."""
    if isinstance(prompt, str):
        return [(prompt, prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [(None, list(prompt))]
    if all(isinstance(p, str) for p in prompt):
        return [(p, p) for p in prompt]
    return [(None, list(p)) for p in prompt]


def _chat_prompt(state: ServerState, body: P.ChatCompletionRequest) -> list[int]:
    messages = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        messages.append({"role": m.role, "content": content or ""})
    tok = state.tokenizer
    if body.continue_final_message:
        if body.add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt false",
                           param="continue_final_message")
        if messages[-1]["role"] != "assistant":
            raise APIError(400, "continue_final_message needs a final assistant message",
                           param="messages")
    text = tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
    if body.continue_final_message:  # end the prompt where the final message's text ends
        final = messages[-1]["content"]
        cut = text.rfind(final) if final else -1
        if cut >= 0:
            text = text[:cut + len(final)]
    return tok.encode(text, add_special_tokens=False)


async def _chat(state: ServerState, body: P.ChatCompletionRequest, raw: Request,
                tenant: str | None):
    _check_model(state, body.model)
    _check_unsupported(body)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name)
        if value is not None and value > state.max_new_tokens:
            raise APIError(400, f"{name} ({value}) is over this server's limit "
                           f"({state.max_new_tokens}: max_model_len - 1 or max_output_tokens)",
                           param=name)
    try:
        prompt_ids = await asyncio.to_thread(_chat_prompt, state, body)
    except InvalidRequestError as err:
        raise APIError(400, str(err), param="messages") from None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    params = _sampling(body, max_tokens, state,
                       logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    request_id = P.new_id("chatcmpl")
    try:
        seqs, submission = await _submit(state, request_id, [(None, prompt_ids)], params,
                                         _salt(tenant, body.cache_salt))
    except InvalidRequestError as err:  # the chat endpoint has no "prompt": name its field
        param = _param_of(str(err))
        raise APIError(400, str(err), param="messages" if param == "prompt" else param,
                       code="context_length_exceeded" if "max_model_len" in str(err)
                       else None) from None
    choices = {s.request_id: ChoiceState(i, None, s.token_ids, i == 0)
               for i, s in enumerate(seqs)}
    created = P.now_s()
    tok = state.tokenizer
    top_n = body.top_logprobs or 0

    if not body.stream:
        if not await _collect(state, raw, submission, choices):
            return Response(status_code=499)
        return P.ChatCompletionResponse(
            id=request_id, created=created, model=state.model_name,
            choices=[P.ChatChoice(index=c.index, message=P.AssistantMessage(content=c.text),
                                  logprobs=chat_logprobs(tok, c.token_ids, c.logprobs, top_n)
                                  if body.logprobs else None,
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                     for c in choices.values()],
            usage=usage_of(choices.values()))

    include_usage, continuous = _usage_options(body)

    def chunk(choice_list: list[dict[str, Any]], usage: P.Usage | None = None) -> dict[str, Any]:
        if usage is None and continuous:
            usage = usage_of(choices.values())
        return _chunk(request_id, "chat.completion.chunk", created, state.model_name,
                      include_usage, choice_list, usage)

    def render(c: ChoiceState, out: StreamOutput) -> list[dict[str, Any]]:
        lp = None
        if body.logprobs and out.logprobs is not None:
            lp = chat_logprobs(tok, out.token_ids, out.logprobs, top_n).model_dump()
        if not (out.text or out.finished or lp is not None):
            return []
        return [chunk([{"index": c.index, "delta": {"content": out.text} if out.text else {},
                        "logprobs": lp,
                        "finish_reason": out.finish_reason if out.finished else None,
                        "stop_reason": out.stop_reason if out.finished else None}])]

    roles = [chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}]) for c in choices.values()]
    return _stream(state, submission, choices, roles, render,
                   lambda: chunk([], usage_of(choices.values())) if include_usage else None)

