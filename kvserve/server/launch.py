"""`kvserve serve`: load the engine, wrap it in the async front end and the API, run uvicorn.

SIGTERM or Ctrl-C: the server stops accepting connections and requests (503 from then on), lets
in-flight requests finish for up to shutdown_timeout_s, then ends whatever still runs or waits:
streams get an error event and [DONE], non-streamed requests the OpenAI-style 503 body; their
blocks are freed and the engine thread stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading

from kvserve.config import EngineConfig, ServerConfig
from kvserve.engine.async_engine import AsyncLLMEngine

log = logging.getLogger("kvserve.server")
FLUSH_S = 5.0  # after the drain: how long ended requests' responses may take to go out


def _server_class(engine: AsyncLLMEngine, drain_s: float):
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn's handling of SIGINT/SIGTERM (stop accepting, let requests finish, then
            cancel), minus raising the signal again at the end: a graceful stop exits 0."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets=None) -> None:
            """Drain before uvicorn's own shutdown (which would cancel handlers mid-response):
            stop accepting connections and requests (new ones get 503), let in-flight ones
            run for up to drain_s, then end the rest through the engine, so streams end with
            an error event and [DONE] and waiting requests get the 503 body; uvicorn then
            closes the connections once those responses are written."""
            for server in self.servers:
                server.close()
            engine.stop_accepting()
            if not await asyncio.to_thread(engine.wait_idle, drain_s):
                log.warning("shutdown: requests still in flight after %.0f s; ending them",
                            drain_s)
            await asyncio.to_thread(engine.shutdown)
            self.config.timeout_graceful_shutdown = FLUSH_S
            await super().shutdown(sockets)

    return Server


def serve(engine_config: EngineConfig, config: ServerConfig, log_level: str = "info") -> int:
    import uvicorn

    from kvserve.server.app import build_app
    from kvserve.server.defaults import describe

    engine = AsyncLLMEngine.from_config(
        engine_config, config.max_queue,
        config.max_queue_per_tenant if config.api_keys else None)
    name = config.served_model_name or engine.model_name
    app = build_app(engine, config, name)
    q = engine.kv_quant_check
    check = "" if q is None else (f": check mean KL {q.mean_kl:.4f} nats, top-1 "
                                  f"{q.top1_agreement:.1%} vs {q.reference}")
    print(f"kvserve: serving {name} ({engine_config.dtype}, {engine.device}, "
          f"cache {engine_config.cache.cache_mode}, KV {engine.kv_cache_dtype}{check}) on "
          f"http://{config.host}:{config.port}/v1 "
          f"- loaded in {engine.load_time_s:.1f} s; {engine.weights_description}"
          + (f"; {len(config.api_keys)} API key(s), one cache tenant each"
             if config.api_keys else "") + f"; {describe(config.generation_defaults)}",
          file=sys.stderr, flush=True)
    server = _server_class(engine, config.shutdown_timeout_s)(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level,
        timeout_graceful_shutdown=config.shutdown_timeout_s, access_log=log_level == "debug"))
    server.run()
    # uvicorn leaves a failed start (e.g. the port is taken) with started == False
    return 0 if server.started else 1
