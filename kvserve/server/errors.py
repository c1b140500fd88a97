"""OpenAI-style errors: APIError, its {"error": {...}} body, and the app's exception handlers that
turn validation, engine and HTTP errors into one. Which error a request earns is the routes' call.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve.engine.stream import EngineDeadError, QueueFullError
from kvserve.errors import InvalidRequestError
from kvserve.server import protocol as P

log = logging.getLogger("kvserve.server")
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


def param_of(message: str) -> str | None:
    """The field an engine-side InvalidRequestError is about: the one to change."""
    if "max_tokens" in message:
        return "max_tokens"
    word = message.split(" ", 1)[0].strip("'(),:")
    known = set(P.CompletionRequest.model_fields) | set(P.ChatCompletionRequest.model_fields)
    return word if word in known else None


# -- the app's exception handlers -------------------------------------------------------------
async def on_api_error(request: Request, err: APIError):
    return error_response(err)


async def on_validation_error(request: Request, err: RequestValidationError):
    return error_response(validation_error(err))


async def on_invalid(request: Request, err: InvalidRequestError):
    code = "context_length_exceeded" if "max_model_len" in str(err) else None
    return error_response(APIError(400, str(err), param=param_of(str(err)), code=code))


async def on_queue_full(request: Request, err: QueueFullError):
    return error_response(APIError(429, str(err), "rate_limit_error", code="queue_full",
                                   headers={"Retry-After": str(err.retry_after_s)}))


async def on_dead(request: Request, err: EngineDeadError):
    return error_response(APIError(503, str(err), "service_unavailable"))


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


async def on_other(request: Request, err: Exception):
    log.exception("unhandled error")
    return error_response(APIError(500, f"internal error: {type(err).__name__}",
                                   "server_error"))


HANDLERS: dict[type[Exception], Any] = {
    APIError: on_api_error, RequestValidationError: on_validation_error,
    InvalidRequestError: on_invalid, QueueFullError: on_queue_full, EngineDeadError: on_dead,
    StarletteHTTPException: on_http, Exception: on_other}


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error a client can cause, and any other, with an OpenAI-style body."""
    for exc_class, handler in HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
