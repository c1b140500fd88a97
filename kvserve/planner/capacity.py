"""The capacity planner: how much KV cache a model needs, how many requests fit beside its weights.

plan() answers for one model, memory, context and concurrency, for the chosen KV dtype and every
other one side by side. Bytes come from KVLayout, the formula the engine's pool allocates with;
a request holds whole blocks, so its context is rounded up to the block size. No torch.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

from kvserve.config import (
    DEFAULT_SINK_TOKENS,
    MAX_BLOCK_SIZE,
    SINKS_CONTEXT_FACTOR,
    parse_size,
    residual_window,
)
from kvserve.errors import ConfigError
from kvserve.kv_dtypes import resolve_kv_pair, split_kv_dtype
from kvserve.kvcache.layout import KV_FORMAT_SHORT_NAMES, KVLayout, kv_format, short_kv_dtype
from kvserve.kvcache.policy import Sinks
from kvserve.planner.presets import find_preset, unknown_preset_error
from kvserve.planner.shapes import ModelShape, read_gguf, read_hf_config

# Bytes per parameter of the weights: int4 is 4 bits plus an fp16 scale and zero point per 128.
WEIGHT_BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0,
                          "int4": 0.5 + 4 / 128}
WEIGHT_DTYPES = (*WEIGHT_BYTES_PER_PARAM, "stored")  # stored: as the GGUF file holds them
DEFAULT_RESERVE = "10%"  # like vLLM's gpu_memory_utilization=0.9


def resolve_model(model: str | None) -> ModelShape:
    """None: the embedded default GGUF; else a preset name, a config.json, a Hugging Face folder
    or a GGUF file."""
    from kvserve.model_files import (
        DEFAULT_MODEL_NAME,
        default_model_path,
        is_gguf_file,
        locate_model,
    )

    if model is None:
        return replace(read_gguf(default_model_path()), name=DEFAULT_MODEL_NAME)
    preset = find_preset(model)
    if preset is not None:
        return preset
    path = os.path.expanduser(model)
    if not os.path.exists(path) and os.sep not in model and not model.endswith((".json",
                                                                                ".gguf")):
        raise unknown_preset_error(model)
    if os.path.isfile(path) and not is_gguf_file(path):
        return read_hf_config(path)  # a config.json under any name
    kind, where = locate_model(model)
    return read_gguf(where) if kind == "gguf" else read_hf_config(where)


@dataclass(frozen=True)
class KVDtypePlan:
    """The figures for one KV dtype."""

    kv_cache_dtype: str
    bytes_per_token: int
    bytes_per_token_per_layer: int
    bytes_per_block: int
    blocks_per_request: int
    bytes_per_request: int
    max_concurrent_requests: int
    max_context_at_concurrency: int
    fits: bool
    pool_blocks: int = 0  # blocks of the KV budget (the engine's pool of this size)


@dataclass(frozen=True)
class CapacityPlan:
    model: ModelShape
    context: int
    concurrency: int
    memory_bytes: int
    block_size: int
    weights_dtype: str
    weights_bytes: int
    reserve_bytes: int
    reserve_text: str
    kv_budget_bytes: int
    kv: KVDtypePlan  # the chosen KV dtype
    by_kv_cache_dtype: dict[str, KVDtypePlan]
    mha_formula_bytes_per_token: int
    problems: tuple[str, ...]  # why it does not fit (empty: it fits)
    suggestions: tuple[str, ...]  # what would
    kv_residual_tokens: int = 0  # quantized formats' residual window (whole-block tokens)
    retention: Sinks | None = None  # --cache-policy sinks: what each request keeps

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        m, kv = self.model, self.kv
        return {
            "model": {"name": m.name, "source": m.source, "architecture": m.architecture,
                      "attention": m.attention_kind, "num_layers": m.num_layers,
                      "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
                      "head_dim": m.head_dim, "hidden_size": m.hidden_size,
                      "vocab_size": m.vocab_size, "max_context": m.max_context,
                      "sliding_window": m.sliding_window,
                      "num_sliding_layers": m.num_sliding_layers, "num_params": m.num_params},
            "context": self.context, "concurrency": self.concurrency,
            "memory_bytes": self.memory_bytes, "block_size": self.block_size,
            "kv_residual_tokens": self.kv_residual_tokens, "kv_cache_dtype": kv.kv_cache_dtype,
            "weights_dtype": self.weights_dtype,
            "bytes_per_token": kv.bytes_per_token,
            "bytes_per_token_per_layer": kv.bytes_per_token_per_layer,
            "bytes_per_block": kv.bytes_per_block, "blocks_per_request": kv.blocks_per_request,
            "bytes_per_request": kv.bytes_per_request, "weights_bytes": self.weights_bytes,
            "reserve_bytes": self.reserve_bytes, "kv_budget_bytes": self.kv_budget_bytes,
            "max_concurrent_requests": kv.max_concurrent_requests,
            "max_context_at_concurrency": kv.max_context_at_concurrency,
            "fits": self.fits, "problems": list(self.problems),
            "suggestions": list(self.suggestions),
            "mha_formula_bytes_per_token": self.mha_formula_bytes_per_token,
            "cache_policy": "full" if self.retention is None else "sinks",
            "sink_tokens": None if self.retention is None else self.retention.sink_tokens,
            "window_tokens": None if self.retention is None else self.retention.window,
            "by_kv_cache_dtype": {k: {f: v for f, v in asdict(p).items() if f != "kv_cache_dtype"}
                            for k, p in self.by_kv_cache_dtype.items()},
        }


def _positive_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def parse_reserve(value: str | int | float, memory_bytes: int) -> tuple[int, str, float | None]:
    """'10%' of memory, a size ('2GiB') or 0: (bytes, how it was stated, the fraction of memory
    when it was given as one)."""
    text = str(value).strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            percent = -1.0
        if not 0 <= percent < 100:
            raise ConfigError(f"reserve must be a percentage in [0, 100) or a size, got {value!r}")
        return int(memory_bytes * percent / 100), f"{percent:g}% of memory", percent / 100
    if text in ("0", "0.0"):
        return 0, "none", None
    return parse_size(value, "reserve"), "stated", None


def weights_bytes_of(model: ModelShape, weights_dtype: str) -> int:
    if weights_dtype == "stored":
        if model.stored_weights_bytes is None:
            raise ConfigError("--weights-dtype stored needs a GGUF file (its tensors' sizes); "
                              f"choose one of {', '.join(WEIGHT_BYTES_PER_PARAM)}")
        return model.stored_weights_bytes
    if weights_dtype not in WEIGHT_BYTES_PER_PARAM:
        raise ConfigError(f"weights dtype must be one of {', '.join(WEIGHT_DTYPES)}, "
                          f"got {weights_dtype!r}")
    return int(model.num_params * WEIGHT_BYTES_PER_PARAM[weights_dtype])


def retention(cache_policy: str, sink_tokens: int, window_tokens: int | None, block_size: int,
              max_context: int) -> Sinks | None:
    """The engine's reading of --cache-policy/--sink-tokens/--window-tokens, as its own Sinks
    policy (each request holds the sinks' blocks, the window's and the block being written; the
    default window leaves no room for a prefill step, which the engine also keeps)."""
    if cache_policy == "full":
        if window_tokens is not None:
            raise ConfigError("window_tokens applies to cache_policy 'sinks'")
        return None
    if cache_policy != "sinks":
        raise ConfigError(f"cache_policy must be full or sinks, got {cache_policy!r}")
    if not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ConfigError(f"sink_tokens must be a non-negative integer, got {sink_tokens!r}")
    window = window_tokens if window_tokens is not None else Sinks.default_window(
        max_context, sink_tokens, block_size, 0)
    if not isinstance(window, int) or window < block_size:
        raise ConfigError(f"window_tokens must hold at least one block ({block_size} tokens), "
                          f"got {window!r}")
    return Sinks(sink_tokens, window, block_size)


def request_bytes(layout: KVLayout, model: ModelShape, num_tokens: int,
                  kept: Sinks | None = None) -> tuple[int, int]:
    """(blocks, bytes) one request of num_tokens holds: whole blocks in every full-attention
    layer; a sliding-window layer keeps at most the window's tokens; under sinks, every layer
    the sinks' and the window's."""
    if kept is not None:  # steady decode: no prefill step in flight
        num_tokens = kept.most_tokens_held(num_tokens, 0, layout.block_size)
    blocks = layout.num_blocks_for_tokens(num_tokens)
    per_layer_block = layout.bytes_per_block_per_layer
    full_layers = model.num_layers - model.num_sliding_layers
    num_bytes = blocks * full_layers * per_layer_block
    if model.num_sliding_layers:
        window_blocks = layout.num_blocks_for_tokens(min(num_tokens, model.sliding_window))
        num_bytes += window_blocks * model.num_sliding_layers * per_layer_block
    return blocks, num_bytes


def _max_context(layout: KVLayout, model: ModelShape, concurrency: int, budget: int,
                 kept: Sinks | None = None) -> int:
    """The longest context (whole blocks) `concurrency` requests can each hold in `budget`
    (each with its residual window, quantized formats); under sinks, up to the engine's default
    max_model_len (SINKS_CONTEXT_FACTOR x the model's context)."""
    limit = model.max_context if kept is None else SINKS_CONTEXT_FACTOR * model.max_context
    room = budget - layout.fixed_bytes - concurrency * layout.residual_bytes_per_seq
    lo, hi = 0, 1
    while concurrency * request_bytes(layout, model, hi * layout.block_size, kept)[1] <= room:
        lo, hi = hi, hi * 2
        if hi > 2**40:  # only windowed layers, or sinks: memory never runs out
            return limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if concurrency * request_bytes(layout, model, mid * layout.block_size, kept)[1] <= room:
            lo = mid
        else:
            hi = mid
    return min(lo * layout.block_size, limit)


def dtype_plan(model: ModelShape, kv_cache_dtype: str, block_size: int, context: int,
               concurrency: int, budget: int, window_tokens: int = 0,
               kept: Sinks | None = None) -> KVDtypePlan:
    """A request's bytes are its blocks plus, for a quantized K or V, its residual window (its
    window_tokens and partial block in float32 per quantized side:
    KVLayout.residual_bytes_per_seq)."""
    layout = KVLayout(model.to_spec(), block_size, kv_cache_dtype, window_tokens=window_tokens)
    blocks, per_request = request_bytes(layout, model, context, kept)
    per_request += layout.residual_bytes_per_seq
    room = max(0, budget - layout.fixed_bytes)
    max_requests = room // per_request
    pool_blocks = max(0, budget - layout.fixed_bytes - concurrency * layout.residual_bytes_per_seq
                      ) // layout.bytes_per_block
    return KVDtypePlan(
        kv_cache_dtype=short_kv_dtype(layout.name),
        bytes_per_token=layout.bytes_per_token,
        bytes_per_token_per_layer=layout.bytes_per_token_per_layer,
        bytes_per_block=layout.bytes_per_block, blocks_per_request=blocks,
        bytes_per_request=per_request, max_concurrent_requests=max_requests,
        max_context_at_concurrency=_max_context(layout, model, concurrency, budget, kept),
        fits=max_requests >= concurrency and (context <= model.max_context or kept is not None),
        pool_blocks=pool_blocks)


def plan(model: str | ModelShape | None = None, context: int = 4000, concurrency: int = 20,
         memory: str | int = "24GiB", weights_dtype: str = "bf16", kv_cache_dtype: str = "auto",
         block_size: int = 16, reserve: str | int = DEFAULT_RESERVE,
         weights_memory: str | int | None = None, k_cache_dtype: str | None = None,
         v_cache_dtype: str | None = None, kv_residual_tokens: int | None = None,
         cache_policy: str = "full", sink_tokens: int = DEFAULT_SINK_TOKENS,
         window_tokens: int | None = None, kv_cache_memory: str | int | None = None
         ) -> CapacityPlan:
    """The KV capacity of `model` in `memory` at `context` tokens x `concurrency` requests.
    kv_cache_dtype "auto" is the engine's rule (kv_dtypes.resolve_kv_cache_dtype): the weights
    dtype when that is a float format, else fp16;
    weights_memory overrides the weights' size (e.g. a measured figure); k_cache_dtype /
    v_cache_dtype one side's format; kv_residual_tokens the quantized formats' residual window
    (default 128, whole blocks); cache_policy "sinks" with sink_tokens and window_tokens:
    each request holds only those (and a context may run past the model's), as the engine's
    settings of those names. kv_cache_memory: the KV budget itself (the engine's setting of that
    name), instead of memory less weights and reserve. Inputs that are valid always give a
    plan: weights that leave nothing for the KV cache make one that does not fit (fits false,
    the problem named, the KV figures still given)."""
    context = _positive_int(context, "context")
    concurrency = _positive_int(concurrency, "concurrency")
    bs = _positive_int(block_size, "block_size")
    if bs & (bs - 1) or bs > MAX_BLOCK_SIZE:
        raise ConfigError(f"block_size must be a power of two from 1 to {MAX_BLOCK_SIZE}, "
                          f"got {bs}")
    window = residual_window(kv_residual_tokens, bs)
    memory_bytes = parse_size(memory, "memory")
    reserve_bytes, reserve_text, reserve_fraction = parse_reserve(reserve, memory_bytes)
    shape = model if isinstance(model, ModelShape) else resolve_model(model)
    kept = retention(cache_policy, sink_tokens, window_tokens, bs, shape.max_context)
    kv_cache_dtype = resolve_kv_pair(kv_cache_dtype, weights_dtype, k_cache_dtype,
                                     v_cache_dtype)
    if weights_memory is not None:  # a known size: the dtype no longer decides it
        weights, weights_dtype = parse_size(weights_memory, "weights memory"), "stated"
    else:
        weights = weights_bytes_of(shape, weights_dtype)
    if kv_cache_memory is not None:  # the engine's --kv-cache-memory: the budget itself
        budget = parse_size(kv_cache_memory, "kv_cache_memory")
        memory_bytes, reserve_bytes, reserve_text, reserve_fraction = \
            weights + budget, 0, "none (--kv-cache-memory)", None
    weights_problem = _weights_problem(shape, weights_dtype, weights, memory_bytes,
                                       reserve_bytes)
    budget = max(0, memory_bytes - weights - reserve_bytes)
    chosen = short_kv_dtype(kv_cache_dtype)
    rows = list(KV_FORMAT_SHORT_NAMES.values()) + (
        [] if chosen in KV_FORMAT_SHORT_NAMES.values() else [chosen])
    by_dtype = {name: dtype_plan(shape, name, bs, context, concurrency, budget, window, kept)
                for name in rows}
    kv = by_dtype[chosen]
    bits = sum(kv_format(name).bits for name in split_kv_dtype(chosen))  # K's + V's
    mha = shape.hidden_size * shape.num_layers * bits // 8
    problems, suggestions = _verdict(shape, kv, by_dtype, context, concurrency, memory_bytes,
                                     weights, reserve_bytes, reserve_fraction, kept)
    if weights_problem is not None:
        problems = (weights_problem[0],) + problems
        suggestions = weights_problem[1] + suggestions
    return CapacityPlan(shape, context, concurrency, memory_bytes, bs, weights_dtype, weights,
                        reserve_bytes, reserve_text, budget, kv, by_dtype, mha, problems,
                        suggestions, window, kept)


def _weights_problem(shape: ModelShape, weights_dtype: str, weights: int, memory: int,
                    reserve: int) -> tuple[str, tuple[str, ...]] | None:
    """Weights (and reserve) that take all of the memory: the problem and what would help."""
    if weights + reserve < memory:
        return None
    smallest = int(shape.num_params * WEIGHT_BYTES_PER_PARAM["int4"])
    what = "the weights" if weights >= memory else "the weights and the runtime reserve"
    problem = (f"{what} ({gib(weights)} GiB of {weights_dtype} weights"
               f"{f' + {gib(reserve)} GiB reserve' if weights < memory else ''}) take all of "
               f"the memory ({gib(memory)} GiB): nothing is left for the KV cache")
    return problem, (f"more memory than {gib(weights + reserve)} GiB",
                     f"smaller weights (int4: {gib(smallest)} GiB)", "a smaller model")


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:,.2f}"


def _verdict(shape: ModelShape, kv: KVDtypePlan, by_dtype: dict[str, KVDtypePlan], context: int,
             concurrency: int, memory: int, weights: int, reserve: int,
             reserve_fraction: float | None, kept: Sinks | None = None
             ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    problems, suggestions = [], []
    if context > shape.max_context and kept is None:
        problems.append(f"{context:,} tokens is past the model's context window "
                        f"({shape.max_context:,} tokens)")
        suggestions.append(f"a context of at most {shape.max_context:,} tokens")
        suggestions.append("--cache-policy sinks (StreamingLLM: sinks and a window, past the "
                           "context)")
    if kv.max_concurrent_requests < concurrency:
        problems.append(f"{concurrency} requests of {context:,} tokens need "
                        f"{gib(concurrency * kv.bytes_per_request)} GiB of {kv.kv_cache_dtype} KV "
                        f"cache; {gib(memory - weights - reserve)} GiB is left after weights "
                        f"and reserve")
        if kv.max_concurrent_requests:
            suggestions.append(f"fewer requests: {kv.max_concurrent_requests} at "
                               f"{context:,} tokens")
        if kv.max_context_at_concurrency:
            suggestions.append(f"a shorter context: {kv.max_context_at_concurrency:,} tokens "
                               f"at {concurrency} requests")
        smaller = [p.kv_cache_dtype for p in by_dtype.values()
                   if p.bytes_per_token < kv.bytes_per_token and p.fits]
        if smaller:
            names = ", ".join(smaller[:-1]) + (" or " if len(smaller) > 1 else "") + smaller[-1]
            suggestions.append(f"a smaller KV dtype: {names} fits "
                               f"{concurrency} x {context:,} tokens")
        need = weights + concurrency * kv.bytes_per_request
        need = int(need / (1 - reserve_fraction)) if reserve_fraction else need + reserve
        suggestions.append(f"more memory: {gib(need)} GiB holds {concurrency} x {context:,} "
                           f"tokens in {kv.kv_cache_dtype}")
    return tuple(problems), tuple(suggestions)
