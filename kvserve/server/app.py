"""The OpenAI-compatible HTTP API (FastAPI) over one AsyncLLMEngine: the app, its life cycle (the
engine starts and stops with it), API keys, middleware, error handlers, routes and the limits
/openapi.json states. What each endpoint does is left to completions.py and chat.py.
"""

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kvserve.config import ServerConfig
from kvserve.engine.async_engine import AsyncLLMEngine
from kvserve.engine.stream import EngineDeadError
from kvserve.server import protocol as P
from kvserve.server.chat import create_chat_completion
from kvserve.server.completions import create_completion
from kvserve.server.errors import ERROR_RESPONSES, install_error_handlers
from kvserve.server.metrics import CONTENT_TYPE
from kvserve.server.middleware import TENANT, UNAUTHORIZED, BodyLimitAndCount
from kvserve.server.state import ServerState
from kvserve.server.tokenize import detokenize, tokenize

Tenant = Callable[..., Any]  # a FastAPI dependency: the caller's cache salt, or None


def build_app(engine: AsyncLLMEngine, config: ServerConfig, model_name: str,
              collectors: Sequence[object] = ()) -> FastAPI:
    """The API over `engine`: an AsyncLLMEngine, or anything with its interface (a cluster's
    RemoteEngine); `collectors` add to /metrics."""
    state = ServerState.create(engine, config, model_name, collectors)

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
    tenant = _tenant_dependency(state)
    app.add_middleware(BodyLimitAndCount, state=state)
    install_error_handlers(app)
    _add_info_routes(app, state, tenant)
    _add_generation_routes(app, state, tenant)
    _describe_limits(app, state)
    return app


def _tenant_dependency(state: ServerState) -> Tenant:
    """With API keys: a bearer-token check that yields the key's cache salt (401 otherwise).
    Without: no security scheme in the schema, and nothing checked."""
    if not state.tenants:

        async def no_tenant() -> str | None:
            return None

        return no_tenant
    bearer = HTTPBearer(auto_error=False, description="one of the server's --api-key values")

    async def tenant(request: Request, _: Annotated[HTTPAuthorizationCredentials | None,
                                                    Depends(bearer)]) -> str | None:
        # The middleware checked the key from the headers, before the body was read, and left
        # the key's tenant here; the bearer dependency declares the scheme in /openapi.json.
        salt = getattr(request.state, TENANT, None)
        if salt is None:
            raise UNAUTHORIZED
        return salt

    return tenant


def _add_info_routes(app: FastAPI, state: ServerState, tenant: Tenant) -> None:
    @app.get("/health", response_model=P.Health, responses={503: ERROR_RESPONSES[503]})
    async def health() -> P.Health:
        if state.engine.dead:
            raise EngineDeadError("the engine loop has stopped")
        return P.Health()

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"},
                        401: ERROR_RESPONSES[401]})
    async def metrics(_: Annotated[str | None, Depends(tenant)]) -> Response:
        # with API keys, one is needed: the totals describe every tenant's traffic
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=_errors(400, 401, 404))
    async def tokenize_route(body: P.TokenizeCompletionRequest | P.TokenizeChatRequest,
                             _: Annotated[str | None, Depends(tenant)]) -> P.TokenizeResponse:
        return await tokenize(state, body)

    @app.post("/detokenize", response_model=P.DetokenizeResponse,
              responses=_errors(400, 401, 404))
    async def detokenize_route(body: P.DetokenizeRequest,
                               _: Annotated[str | None, Depends(tenant)]
                               ) -> P.DetokenizeResponse:
        return await detokenize(state, body)

    @app.get("/v1/models", response_model=P.ModelList,
             responses={401: ERROR_RESPONSES[401]})
    async def models(_: Annotated[str | None, Depends(tenant)]) -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=state.model_name, created=P.now_s(),
                                             max_model_len=state.max_model_len)])


def _errors(*statuses: int) -> dict:
    return {s: ERROR_RESPONSES[s] for s in statuses}


def _add_generation_routes(app: FastAPI, state: ServerState, tenant: Tenant) -> None:
    stream_doc = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                        "description": "the response, or server-sent events with stream"}}
    errors = {k: v for k, v in ERROR_RESPONSES.items() if k != 503}

    @app.post("/v1/completions", response_model=P.CompletionResponse,
              responses={**stream_doc, **errors})
    async def completions(body: P.CompletionRequest, raw: Request,
                          salt: Annotated[str | None, Depends(tenant)]):
        return await create_completion(state, body, raw, salt)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
              responses={**stream_doc, **errors})
    async def chat_completions(body: P.ChatCompletionRequest, raw: Request,
                               salt: Annotated[str | None, Depends(tenant)]):
        return await create_chat_completion(state, body, raw, salt)


def _describe_limits(app: FastAPI, state: ServerState) -> None:
    """/openapi.json states this server's own limits: the largest max_tokens it can take and
    the vocabulary token ids must fall in."""
    most = state.max_new_tokens
    vocab = state.engine.vocab_size
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
