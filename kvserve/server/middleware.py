"""The ASGI middleware in front of every route. With API keys, a request to /v1/* or /metrics
without a valid key is answered 401 from its headers alone, before a byte of its body is read or
parsed; a body over max_body_bytes is answered 413 before a handler reads it; API responses are
counted by endpoint and status, and (--access-log, on by default) each request gets one log line
when its response has gone out. Routing is the app's.
"""

import logging
import time

from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve.server.errors import APIError, error_response
from kvserve.server.state import ServerState

API_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
UNAUTHORIZED = APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                        code="invalid_api_key")


TENANT = "kvserve_tenant"  # request.state key: the authenticated caller's tenant salt
ACCESS = "kvserve_access"  # request.state key: the route's token counts for the access log
access_log = logging.getLogger("kvserve.access")


QUIET_PATHS = ("/health", "/metrics")  # probes: logged by nobody


def needs_key(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/metrics", "/tokenize", "/detokenize")


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
        if self.state.config.access_log and scope.get("path", "") not in QUIET_PATHS:
            return await self._logged(scope, receive, send)
        return await self._call(scope, receive, send)

    async def _logged(self, scope, receive, send):
        """One line when the response has gone out (a stream's last chunk included): method,
        path, status, the route's token counts, TTFT and total time. Never text or keys."""
        t0, status = time.monotonic(), [None]
        counts = scope.setdefault("state", {}).setdefault(ACCESS, {})

        async def watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._call(scope, receive, watch)
        finally:
            ttft = counts.get("ttft_s")
            access_log.info(
                "%s %s %s in=%s out=%s cached=%s ttft=%s time=%.3fs", scope.get("method"),
                scope.get("path"), status[0] or "-", counts.get("prompt_tokens", "-"),
                counts.get("completion_tokens", "-"), counts.get("cached_tokens", "-"),
                "-" if ttft is None else f"{ttft:.3f}s", time.monotonic() - t0)

    async def _call(self, scope, receive, send):
        limit = self.state.max_body_bytes
        path = scope.get("path", "")
        endpoint = path if path in API_PATHS else "other"
        headers = dict(scope.get("headers", ()))
        if self.state.tenants and needs_key(path):
            tenant = self.state.authenticate(headers.get(b"authorization", b"").decode("latin-1"))
            if tenant is None:
                if path.startswith("/v1/"):
                    self.state.metrics.count_response(endpoint, 401)
                return await error_response(UNAUTHORIZED)(scope, receive, send)
            scope.setdefault("state", {})[TENANT] = tenant  # the routes' tenant dependency
        length = headers.get(b"content-length", b"")
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
