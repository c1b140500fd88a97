"""kvserve: an LLM inference engine whose center is the KV cache. Public API only.

LLM is imported lazily so that the control plane (config, requests, scheduler, cache metadata,
planner) can be imported without loading torch.
"""

from kvserve.config import EngineConfig
from kvserve.request import RequestOutput, SamplingParams, StructuredOutputs

__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "EngineConfig", "RequestOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from kvserve.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
