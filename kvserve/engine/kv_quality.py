"""How much a KV format changes the model's predictions: the same text run through the model with
its K/V stored in a reference format (float32: exact) and in the format under test, each position's
next-token distribution compared (mean KL divergence, top-1 agreement) and the text's perplexity
under each.

Both runs go through the engine's own paged store and attention (a fresh pool of just enough blocks
per text, the text fed in chunks as chunked prefill feeds a prompt), so what is measured is what a
request served in that format gets: every position attends over the stored, quantized K/V. The
start-up guardrail and `kvserve bench quant` both measure with this.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources

import torch

from kvserve.kvcache.layout import KVLayout
from kvserve.kvcache.snapshot import KVQuality
from kvserve.kvstore.codecs import BLOCK_BITS, INT8_MAX, FloatCodec, KVCodec, TokenGroupBlockCodec
from kvserve.kvstore.paged import PagedKVStore
from kvserve.model.attention.paged import PagedAttention
from kvserve.model.llama import LlamaModel
from kvserve.runner.input_builder import InputBuilder
from kvserve.scheduler.plan import ScheduledSeq, StepPlan

CHUNK = 256  # positions per forward pass (and per [chunk, vocab] block of log-probs)
CALIBRATION_TOKENS = 1024  # the guardrail's text: the first this many tokens of the corpus


def corpus_text() -> str:
    """The public-domain text shipped with kvserve (kvserve/data/README.md says which)."""
    return resources.files("kvserve").joinpath("data/moby_dick.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Variant:
    """A way of storing K/V to measure: a KV format, or (a lab's experiment) that format's layout
    with other codecs for K and for V holding the same parts."""

    label: str
    kv_cache_dtype: str
    codec: KVCodec | None = None  # K's codec (and V's, unless v_codec); None: the format's
    v_codec: KVCodec | None = None
    block_size: int | None = None  # another block size (int8/int4: K's scale group)
    window_tokens: int | None = None  # another residual window (None: the comparison's)


def log_probs(model: LlamaModel, variant: Variant, token_ids: Sequence[int],
              block_size: int = 16, window_tokens: int = 0,
              chunk_size: int = CHUNK) -> Iterator[torch.Tensor]:
    """log_softmax of the next-token logits at every position of token_ids, [rows, vocab] float32
    a chunk of chunk_size positions at a time, with K/V stored as `variant` says (a quantized
    format's residual window of window_tokens, unless the variant names its own)."""
    block_size = variant.block_size or block_size
    window = variant.window_tokens if variant.window_tokens is not None else window_tokens
    layout = KVLayout(model.spec, block_size, variant.kv_cache_dtype, window_tokens=window)
    num_blocks = layout.num_blocks_for_tokens(len(token_ids))
    store = PagedKVStore(layout, num_blocks, model.device)
    if variant.codec is not None or variant.v_codec is not None:
        store.use_codecs(variant.codec or store.codecs[0],
                         variant.v_codec or variant.codec or store.codecs[1])
    attention = PagedAttention(store)
    inputs = InputBuilder(model.device, block_size)
    blocks = tuple(range(num_blocks))
    for start in range(0, len(token_ids), chunk_size):
        chunk = tuple(token_ids[start:start + chunk_size])
        step = inputs.build(StepPlan((ScheduledSeq("text", chunk, start, True, blocks),)))
        attention.prepare(step.meta)
        rows = torch.arange(len(chunk), device=model.device)
        logits = model.forward(step.input_ids, step.positions, attention, step.meta, rows)
        yield logits.log_softmax(dim=-1)


def compare_many(model: LlamaModel, texts: Sequence[Sequence[int]],
                 variants: Sequence[Variant], reference: str = "float32", block_size: int = 16,
                 progress=None, skip: int = 0, window_tokens: int = 0
                 ) -> dict[str, KVQuality]:
    """Each text (its own sequence, positions from 0) in the reference format and in every
    variant, chunk by chunk in lockstep (the reference runs once); the statistics over every
    position but each text's last (which predicts nothing in the text) and its first `skip`, by
    variant label. progress: called with the number of positions done after each chunk."""
    sums = {v.label: [0.0, 0.0, 0.0, 0.0] for v in variants}  # kl, agree, nll_ref, nll
    count = 0
    for ids in texts:
        runs = [log_probs(model, Variant(reference, reference), ids, block_size)]
        runs += [log_probs(model, v, ids, block_size, window_tokens) for v in variants]
        start = 0
        for ref, *tests in zip(*runs):
            n = ref.shape[0]
            targets = torch.tensor(ids[start + 1:start + n + 1], dtype=torch.long,
                                   device=ref.device).unsqueeze(-1)
            m = targets.shape[0]  # the text's last position has no next token
            lo = max(0, min(m, skip - start))  # positions not counted
            ref, targets = ref[lo:m], targets[lo:]
            p_ref, top_ref = ref.exp(), ref.argmax(-1)
            nll_ref = -float(ref.gather(-1, targets).sum())
            for v, test in zip(variants, tests):
                test = test[lo:m]
                acc = sums[v.label]
                acc[0] += float((p_ref * (ref - test)).sum())
                acc[1] += float((top_ref == test.argmax(-1)).sum())
                acc[2] += nll_ref
                acc[3] -= float(test.gather(-1, targets).sum())
            count += m - lo
            start += n
            if progress is not None:
                progress(n)
    if count == 0:
        raise ValueError("no positions to compare: every text needs at least two tokens")
    return {v.label: KVQuality(v.label, reference, count, *(x / count for x in sums[v.label]))
            for v in variants}


def compare(model: LlamaModel, texts: Sequence[Sequence[int]], kv_cache_dtype: str,
            reference: str = "float32", block_size: int = 16,
            codec: KVCodec | None = None, v_codec: KVCodec | None = None,
            progress=None, window_tokens: int = 0) -> KVQuality:
    """compare_many for one KV format (codec, v_codec: other codecs for K's and V's parts, e.g.
    the store's)."""
    variant = Variant(kv_cache_dtype, kv_cache_dtype, codec, v_codec)
    return compare_many(model, texts, [variant], reference, block_size, progress,
                        window_tokens=window_tokens)[kv_cache_dtype]


class SimulatedInt8(FloatCodec):
    """kvserve's first int8, simulated for the quant lab: symmetric, one scale per token per KV
    head, no residual window; the values are rounded as it rounded them and kept in float32."""

    def __init__(self):
        super().__init__("float32")
        self.name = "int8-per-token"

    def encode(self, x, tensor_scale=None):
        x = x.float()
        return {"kv": _round_int8(x, x.abs().amax(dim=-1, keepdim=True))}


def _round_int8(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return (x / scale).round_().clamp_(-INT8_MAX, INT8_MAX) * scale


def scale_alternatives(block_size: int, formats: Sequence[str] = ("int8", "int4")
                       ) -> list[Variant]:
    """The scale granularities the quant lab measures beside the formats it runs: built, K per
    token (V's rule) instead of per channel, and blocks (so groups and residual windows) of twice
    the size; simulated, kvserve's first int8 (symmetric, one scale per token per head, no
    residual window)."""
    out = []
    for name, bits in BLOCK_BITS.items():
        if name in formats:
            per_token = TokenGroupBlockCodec(name, bits)
            out += [Variant(f"{name} alt: per-token K (V's rule)", name, per_token, per_token),
                    Variant(f"{name} alt: {2 * block_size}-token blocks", name,
                            block_size=2 * block_size)]
    if "int8" in formats:
        out.append(Variant("int8 sim: per-token K and V, no window", "float32",
                           SimulatedInt8()))
    return out
