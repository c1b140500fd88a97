"""The OpenAI-compatible server: protocol (pydantic), openai_api (FastAPI), metrics
(prometheus-client), launch (uvicorn). FastAPI, uvicorn, pydantic and prometheus-client are used
here only; they come with the `serve` extra."""
