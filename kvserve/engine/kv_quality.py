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
from importlib import resources

import torch

from kvserve.kvcache.layout import KVLayout
from kvserve.kvcache.snapshot import KVQuality
from kvserve.kvstore.codecs import KVCodec
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


def log_probs(model: LlamaModel, kv_cache_dtype: str, token_ids: Sequence[int],
              block_size: int = 16, codec: KVCodec | None = None) -> Iterator[torch.Tensor]:
    """log_softmax of the next-token logits at every position of token_ids, [rows, vocab] float32
    a chunk at a time, with K/V stored in kv_cache_dtype (codec: another codec for that format's
    parts, e.g. a test's broken one)."""
    layout = KVLayout(model.spec, block_size, kv_cache_dtype)
    num_blocks = layout.num_blocks_for_tokens(len(token_ids))
    store = PagedKVStore(layout, num_blocks, model.device)
    if codec is not None:
        store.codec = codec
    attention = PagedAttention(store)
    inputs = InputBuilder(model.device, block_size)
    blocks = tuple(range(num_blocks))
    for start in range(0, len(token_ids), CHUNK):
        chunk = tuple(token_ids[start:start + CHUNK])
        step = inputs.build(StepPlan((ScheduledSeq("text", chunk, start, True, blocks),)))
        attention.prepare(step.meta)
        rows = torch.arange(len(chunk), device=model.device)
        logits = model.forward(step.input_ids, step.positions, attention, step.meta, rows)
        yield logits.log_softmax(dim=-1)


def compare(model: LlamaModel, texts: Sequence[Sequence[int]], kv_cache_dtype: str,
            reference: str = "float32", block_size: int = 16,
            codec: KVCodec | None = None, progress=None) -> KVQuality:
    """Each text (its own sequence, positions from 0) in both formats; the statistics over every
    position but each text's last (which predicts nothing in the text). progress: called with the
    number of positions done after each chunk."""
    kl = agree = nll_ref = nll = 0.0
    count = 0
    for ids in texts:
        pairs = zip(log_probs(model, reference, ids, block_size),
                    log_probs(model, kv_cache_dtype, ids, block_size, codec))
        start = 0
        for ref, test in pairs:
            n = ref.shape[0]
            targets = torch.tensor(ids[start + 1:start + n + 1], dtype=torch.long,
                                   device=ref.device)
            m = targets.shape[0]  # the text's last position has no next token
            ref, test = ref[:m], test[:m]
            kl += float((ref.exp() * (ref - test)).sum())
            agree += float((ref.argmax(-1) == test.argmax(-1)).sum())
            nll_ref -= float(ref.gather(-1, targets.unsqueeze(-1)).sum())
            nll -= float(test.gather(-1, targets.unsqueeze(-1)).sum())
            count += m
            start += n
            if progress is not None:
                progress(n)
    if count == 0:
        raise ValueError("no positions to compare: every text needs at least two tokens")
    return KVQuality(kv_cache_dtype, reference, count, kl / count, agree / count,
                     nll_ref / count, nll / count)
