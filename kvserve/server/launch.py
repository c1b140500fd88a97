"""`kvserve serve`: load the engine, wrap it in the async front end and the API, run uvicorn.

SIGTERM or Ctrl-C: uvicorn stops accepting connections and lets in-flight requests finish for up
to shutdown_timeout_s; whatever is still running then is aborted and its blocks freed, and the
engine thread stops.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading

from kvserve.config import EngineConfig, ServerConfig

log = logging.getLogger("kvserve.server")


def _server_class():
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

    return Server


def serve(engine_config: EngineConfig, config: ServerConfig, log_level: str = "info") -> int:
    import uvicorn

    from kvserve.engine.async_engine import AsyncLLMEngine
    from kvserve.server.app import build_app

    _Server = _server_class()
    engine = AsyncLLMEngine.from_config(engine_config, config.max_queue)
    name = config.served_model_name or engine.model_name
    app = build_app(engine, config, name)
    print(f"kvserve: serving {name} ({engine_config.dtype}, {engine.device}, "
          f"cache {engine_config.cache.cache_mode}) on http://{config.host}:{config.port}/v1 "
          f"- loaded in {engine.load_time_s:.1f} s"
          + (f"; {len(config.api_keys)} API key(s), one cache tenant each"
             if config.api_keys else ""), file=sys.stderr, flush=True)
    server = _Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level,
        timeout_graceful_shutdown=config.shutdown_timeout_s, access_log=log_level == "debug"))
    server.run()
    # uvicorn leaves a failed start (e.g. the port is taken) with started == False
    return 0 if server.started else 1
