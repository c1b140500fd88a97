"""--generation-config: the sampling defaults of requests that leave a field out. "auto" (the
default, as vLLM's): the model's own generation_config.json where it has one (a Hugging Face
folder; a GGUF file has none), else OpenAI's defaults; "none": OpenAI's (temperature 1, top_p 1,
no top_k); a path: a JSON file with any of temperature, top_p, top_k, min_p,
repetition_penalty, max_tokens (or max_new_tokens), and do_sample (false: greedy).
"""

from __future__ import annotations

import json
import os

from kvserve.errors import ConfigError, InvalidRequestError
from kvserve.request import SamplingParams

FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")


def generation_defaults(setting: str, model: str | None) -> tuple[tuple[str, object], ...]:
    """The defaults as (field, value) pairs; ConfigError naming the problem."""
    if setting == "none":
        return ()
    if setting == "auto":
        if model is None or not os.path.isdir(model):
            return ()
        path = os.path.join(model, "generation_config.json")
        if not os.path.isfile(path):
            return ()
    else:
        path = setting
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read --generation-config {path!r}: "
                          f"{getattr(err, 'strerror', None) or err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--generation-config {path!r} must hold a JSON object")
    out = {k: raw[k] for k in FIELDS if raw.get(k) is not None}
    if raw.get("max_new_tokens") is not None and "max_tokens" not in out:
        out["max_tokens"] = raw["max_new_tokens"]
    if raw.get("do_sample") is False:  # transformers' greedy
        out["temperature"] = 0.0
    try:
        SamplingParams(**out)
    except (InvalidRequestError, TypeError) as err:
        raise ConfigError(f"--generation-config {path!r}: {err}") from None
    return tuple(out.items())


def describe(defaults: tuple[tuple[str, object], ...]) -> str:
    if not defaults:
        return "sampling defaults: OpenAI's (temperature 1.0, top_p 1.0)"
    return "sampling defaults: " + ", ".join(f"{k} {v}" for k, v in defaults)
