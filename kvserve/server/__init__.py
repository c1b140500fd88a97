"""The OpenAI-compatible server: protocol (pydantic), app (FastAPI: routes, life cycle) with
completions and chat (the endpoints), submission and streaming (requests to sequences, outputs to
responses or server-sent events), errors, middleware, state, metrics (prometheus-client), launch
(uvicorn). FastAPI, uvicorn, pydantic and prometheus-client are used here only; they come with
the `serve` extra.

The server owns HTTP only: it validates and tokenizes, turns requests into sequences for the
engine, and turns the engine's outputs into OpenAI responses or server-sent events, reading the
engine through AsyncLLMEngine's public members alone. Every error a client can cause is answered
with an OpenAI-style body, {"error": {"message", "type", "param", "code"}}, and the right status:
400 invalid, 401 bad key, 404 unknown model or route, 413 body too large, 429 queue full (with
Retry-After), 500 engine error (that request only), 503 shutting down.
"""
