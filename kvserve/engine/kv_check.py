"""The quantized-KV guardrail: before a quantized KV format serves anything, the engine runs a
fixed calibration text (the first CALIBRATION_TOKENS tokens of the shipped public-domain corpus)
through the model twice, with K/V in float32 and in the chosen format, and compares the
next-token distributions (engine/kv_quality.py). Over the limits below it refuses to start
(--kv-quant-check refuse, the default) or says so in the log (warn).

Limits, from measurements on the default model (SmolLM2-135M, 1,023 predictions, see the README's
quantized-KV section): int8 mean KL 0.0011 nats / top-1 97.8%, fp8_e4m3 0.013 / 94.7%,
fp8_e5m2 0.044 / 89.5%, bfloat16 0.00007 / 99.6%. A format past MAX_MEAN_KL or under
MIN_TOP1_AGREEMENT changes the model's next-token choice on more than one position in five or
moves its distributions by more than twice fp8_e5m2's: a broken codec, or a model whose K/V the
format cannot hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kvserve.engine.kv_quality import CALIBRATION_TOKENS, compare, corpus_text
from kvserve.errors import ConfigError
from kvserve.kvcache.snapshot import KVQuality
from kvserve.kvstore.codecs import KVCodec
from kvserve.model.llama import LlamaModel
from kvserve.model.tokenizer import Tokenizer

log = logging.getLogger("kvserve.engine")
MAX_MEAN_KL = 0.1  # nats
MIN_TOP1_AGREEMENT = 0.80


def calibration_tokens(tokenizer: Tokenizer, context: int) -> list[int]:
    """The calibration text, cut to the model's own context if that is shorter."""
    return tokenizer.encode(corpus_text())[:min(CALIBRATION_TOKENS, context)]


def check_kv_format(model: LlamaModel, tokenizer: Tokenizer, kv_cache_dtype: str,
                    codecs: Sequence[KVCodec], block_size: int, window_tokens: int,
                    context: int, mode: str, model_id: str = "") -> KVQuality:
    """Measure the format against float32 K/V on the calibration text (or read the measure a
    start with the same model files, compute dtype, device, format, codec and calibration
    tokens saved) and judge it: ConfigError (mode "refuse") or a warning ("warn") naming the
    figures when over the limits. model_id: the model files' fingerprint ("" : never cached)."""
    tokens = calibration_tokens(tokenizer, context)
    key = _cache_key(model, model_id, kv_cache_dtype, codecs, (block_size, window_tokens),
                     tokens)
    t0 = time.perf_counter()
    q = _load(key)
    cached = q is not None
    if q is None:
        projections = model.num_kv_projections
        q = compare(model, [tokens], kv_cache_dtype, block_size=block_size, codec=codecs[0],
                    v_codec=codecs[1], window_tokens=window_tokens)
        model.num_kv_projections = projections  # the check is not the engine's work
        _save(key, q)
    took = time.perf_counter() - t0
    figures = (f"mean KL {q.mean_kl:.4f} nats (limit {MAX_MEAN_KL}), top-1 agreement "
               f"{q.top1_agreement:.1%} (at least {MIN_TOP1_AGREEMENT:.0%}), perplexity "
               f"{q.perplexity:.2f} vs {q.perplexity_reference:.2f} in float32, over "
               f"{q.num_predictions} positions of calibration text "
               + ("(saved by an earlier start)" if cached else f"({took:.1f} s)"))
    if q.mean_kl <= MAX_MEAN_KL and q.top1_agreement >= MIN_TOP1_AGREEMENT:
        log.info("quantized-KV check: %s passes: %s", kv_cache_dtype, figures)
        return q
    message = (f"kv_cache_dtype {kv_cache_dtype} fails the quantized-KV check: {figures}; "
               f"choose another KV format, or pass --kv-quant-check warn to serve it anyway")
    if mode == "refuse":
        raise ConfigError(message)
    log.warning("%s", message)
    return q


def _cache_dir() -> Path:
    root = os.environ.get("KVSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"),
                                                               ".cache", "kvserve")
    return Path(root) / "kv_checks"


def _cache_key(model: LlamaModel, model_id: str, kv_cache_dtype: str,
               codecs: Sequence[KVCodec], blocks: tuple[int, int],
               tokens: list[int]) -> str | None:
    if not model_id:
        return None
    try:  # a changed codec is measured afresh
        sources = [inspect.getsource(type(c)) for c in codecs]
    except (OSError, TypeError):  # no source to key on: measure every time
        return None
    names = [f"{type(c).__module__}.{type(c).__qualname__}" for c in codecs]
    blob = json.dumps([model_id, str(model.act_dtype), model.device.type, kv_cache_dtype,
                       names, sources, blocks, tokens, torch.__version__])
    return hashlib.sha256(blob.encode()).hexdigest()


def _load(key: str | None) -> KVQuality | None:
    if key is None:
        return None
    try:
        return KVQuality(**json.loads((_cache_dir() / f"{key}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _save(key: str | None, q: KVQuality) -> None:
    if key is None:
        return
    try:
        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(q)))
        tmp.replace(folder / f"{key}.json")
    except OSError as err:  # a read-only home: measure again next time
        log.warning("quantized-KV check: result not cached (%s)", err)
