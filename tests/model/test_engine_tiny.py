"""The engine end to end on the tiny random-weight Llama (tests/fixtures.py).

Greedy output is checked against a dense reference (the whole sequence re-run through the model
with the no-cache backend, argmax) in both cache modes; then batching, file formats, dtypes, the
fused C decode layer against the PyTorch layer and every sampling option. Streaming, prompts and
accounting are in test_engine_streaming_and_accounting.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.kernels import cpu as cpu_kernels
from kvserve.model.attention import AttentionMetadata
from kvserve.model.attention.dense import NoCacheAttention

PROMPTS = [
    "The",  # 1 token
    "The KV cache keeps the keys",  # 9 tokens
    "def forward(self, x):\n    return self.proj(x)",
    # ~70 tokens: the prefill alone is past the contiguous cache's first 64-token capacity
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 65536 3.5e-3 0x1F and then the quick brown "
    "fox jumps over the lazy dog. Unicode: héllo wörld",
]
NUM_TOKENS = 72  # short prompts cross the 64-token capacity while decoding
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
SHORT_GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
TEXT_PROMPT = "I'm sure you're right; it's what we've said and they'll agree."


def greedy_tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [list(o.token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def dense_greedy(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """The quadratic reference: the whole sequence through the model at every step, no cache."""
    seq = list(prompt_ids)
    for _ in range(num_tokens):
        n = len(seq)
        meta = AttentionMetadata.single("ref", n)
        logits = model.forward(torch.tensor(seq), torch.arange(n), NoCacheAttention(model.spec),
                               meta, torch.tensor([n - 1]))
        seq.append(int(logits[0].argmax()))
    return seq[len(prompt_ids):]


def prompt_logits(model, prompt_ids: list[int]) -> torch.Tensor:
    n = len(prompt_ids)
    return model.forward(torch.tensor(prompt_ids), torch.arange(n), NoCacheAttention(model.spec),
                         AttentionMetadata.single("ref", n), torch.tensor([n - 1]))[0]


@pytest.fixture(scope="module")
def llm(tiny_hf_dir) -> LLM:
    return LLM(model=str(tiny_hf_dir), cache_mode="contiguous")


@pytest.fixture(scope="module")
def llm_paged(tiny_hf_dir) -> LLM:
    return LLM(model=str(tiny_hf_dir), cache_mode="paged", block_size=4, kv_cache_memory="4MiB")


@pytest.fixture(scope="module")
def llm_none(tiny_hf_dir) -> LLM:
    return LLM(model=str(tiny_hf_dir), cache_mode="none")


@pytest.fixture(scope="module")
def prompt_ids(llm) -> list[list[int]]:
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    assert [len(i) for i in ids][:2] == [1, 9] and len(ids[3]) > 64
    return ids


@pytest.fixture(scope="module")
def reference(llm, prompt_ids) -> list[list[int]]:
    return [dense_greedy(llm.engine.model, ids, NUM_TOKENS) for ids in prompt_ids]


@pytest.fixture(scope="module")
def full_greedy(llm):
    """A greedy run with no stop condition: the ground truth for stop strings and stop ids."""
    return llm.generate(TEXT_PROMPT, SamplingParams(max_tokens=40, temperature=0.0,
                                                    ignore_eos=True), use_tqdm=False)[0]


# -- greedy fidelity -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["none", "contiguous", "paged"])
def test_greedy_matches_dense_reference(mode, llm, llm_none, llm_paged, prompt_ids, reference):
    engine_llm = {"none": llm_none, "contiguous": llm, "paged": llm_paged}[mode]
    for ids, expected in zip(prompt_ids, reference):
        out = engine_llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
        assert list(out.token_ids) == expected
        assert out.finish_reason == "length" and len(out.token_ids) == NUM_TOKENS


def test_batched_equals_one_by_one(llm, llm_none, llm_paged, reference):
    assert greedy_tokens(llm, PROMPTS) == reference
    assert greedy_tokens(llm_paged, PROMPTS) == reference
    assert greedy_tokens(llm_none, PROMPTS[:3], SHORT_GREEDY) == [r[:24] for r in reference[:3]]


def test_hf_folder_and_f32_gguf_give_identical_tokens(llm, tiny_gguf_path, reference):
    gguf_llm = LLM(model=str(tiny_gguf_path))
    assert [gguf_llm.tokenizer.encode(p) for p in PROMPTS] == \
        [llm.tokenizer.encode(p) for p in PROMPTS]
    assert greedy_tokens(gguf_llm, PROMPTS, SHORT_GREEDY) == [r[:24] for r in reference]


def test_bfloat16_runs_and_mostly_agrees_with_float32(tiny_hf_dir, reference):
    bf16 = LLM(model=str(tiny_hf_dir), dtype="bfloat16")
    assert bf16.engine.model.dtype == torch.bfloat16
    assert bf16.engine.cache_snapshot().bytes_per_token == 256
    got = greedy_tokens(bf16, PROMPTS, SHORT_GREEDY)
    expected = [r[:24] for r in reference]
    assert [g[0] for g in got] == [e[0] for e in expected]  # first tokens all agree
    agree = sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e))
    assert agree >= 0.5 * sum(len(e) for e in expected), agree


# -- the fused C decode layer against the PyTorch reference layer ----------------------------------
def decode_logits(llm: LLM, prompt_ids: list[int], num_tokens: int,
                  forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy decode straight through model.forward over the engine's own contiguous cache
    (forced: feed these tokens instead of the argmax ones, teacher-forcing)."""
    model, cache = llm.engine.model, llm.engine.runner.attention
    feed, start, tokens, rows = list(prompt_ids), 0, [], []
    try:
        for _ in range(num_tokens):
            n = len(feed)
            meta = AttentionMetadata.single("probe", n, start)
            cache.prepare(meta)
            logits = model.forward(torch.tensor(feed), torch.arange(start, start + n), cache,
                                   meta, torch.tensor([n - 1]))[0]
            start += n
            feed = [int(logits.argmax()) if forced is None else forced[len(tokens)]]
            tokens.append(feed[0])
            rows.append(logits)
    finally:
        cache.release("probe")
    return tokens, torch.stack(rows)


@pytest.mark.skipif(not cpu_kernels.available(), reason="C kernels not built (no compiler)")
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 1e-3)])
def test_fast_decode_matches_reference_layer(tiny_hf_dir, dtype, tol):
    fast_llm = LLM(model=str(tiny_hf_dir), dtype=dtype, cache_mode="contiguous")
    model = fast_llm.engine.model
    assert model.use_fast_decode  # the fused path is the default here
    ids = fast_llm.tokenizer.encode("The KV cache")  # <= 8 tokens: prefill takes it too
    runs, engine_runs = {}, {}
    try:
        for fast in (True, False):
            model.use_fast_decode = fast
            runs[fast] = decode_logits(fast_llm, ids, 40)
            # through the engine as well, with several decode rows per step
            engine_runs[fast] = greedy_tokens(fast_llm, PROMPTS[:3], SHORT_GREEDY)
    finally:
        model.use_fast_decode = True
    assert runs[True][0] == runs[False][0]
    assert (runs[True][1] - runs[False][1]).abs().max().item() < tol
    assert engine_runs[True] == engine_runs[False]


@pytest.mark.skipif(not cpu_kernels.available(), reason="C kernels not built (no compiler)")
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_one_call_decode_step_equals_the_per_layer_calls(tiny_hf_dir, kv_dtype, monkeypatch):
    """kv_decode_layers (every layer of a paged decode step in one C call, writing K/V itself)
    against the per-layer path it composes (layer_pre, the store's write, the paged decode
    attention, layer_post) and the final norm and LM head after (LlamaModel._logits): the same
    tokens and log-probabilities, and the stores hold the same K/V bit for bit."""
    from kvserve.model.attention.paged import PagedAttention

    calls = []
    real = cpu_kernels.decode_layers_
    monkeypatch.setattr(cpu_kernels, "decode_layers_",
                        lambda h, *a: (calls.append(h.shape[0]), real(h, *a))[1])
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(PagedAttention, "fused_decode_enabled", fused)
        llm = LLM(model=str(tiny_hf_dir), cache_mode="paged", kv_cache_dtype=kv_dtype,
                  enable_prefix_caching=False)
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=3)
                  for n in (30, 17, 40)]  # sequences leave the batch at different steps
        outs = [o.outputs[0] for o in llm.generate(PROMPTS[1:4], params, use_tqdm=False)]
        keys, values = llm.engine.runner.attention.store.float_kv()
        runs[fused] = ([list(o.token_ids) for o in outs], keys.clone(), values.clone(),
                       [lp for o in outs for lp, _ in o.logprobs])
        if fused:
            assert calls and max(calls) == 3 and min(calls) == 1  # batches of 3, 2 and 1 rows
            calls.clear()
    assert not calls  # switched off: the per-layer path ran
    assert runs[True][0] == runs[False][0]
    assert torch.equal(runs[True][1], runs[False][1])
    assert torch.equal(runs[True][2], runs[False][2])
    torch.testing.assert_close(torch.tensor(runs[True][3]), torch.tensor(runs[False][3]),
                               rtol=1e-5, atol=1e-5)


# -- sampling -----------------------------------------------------------------------------------
def test_same_seed_same_tokens_different_seed_different(llm):
    first = greedy_tokens(llm, [TEXT_PROMPT], SAMPLED)
    assert greedy_tokens(llm, [TEXT_PROMPT], SAMPLED) == first
    other = SamplingParams(max_tokens=16, temperature=1.0, seed=4321, ignore_eos=True)
    assert greedy_tokens(llm, [TEXT_PROMPT], other) != first


def test_seeded_request_same_alone_or_batched(llm):
    alone = llm.generate(TEXT_PROMPT, SAMPLED, use_tqdm=False)[0]
    prompts = ["The", TEXT_PROMPT, PROMPTS[3], "def forward"]
    params = [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True), SAMPLED,
              SamplingParams(max_tokens=5, temperature=0.7, seed=7, top_k=50),
              SamplingParams(max_tokens=12, temperature=0.0)]
    batched = llm.generate(prompts, params, use_tqdm=False)[1]
    assert batched.token_ids == alone.token_ids and batched.text == alone.text


def test_n_samples_seeded(llm):
    params = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=99, ignore_eos=True)
    out = llm.generate(TEXT_PROMPT, params, use_tqdm=False)[0]
    again = llm.generate(TEXT_PROMPT, params, use_tqdm=False)[0]
    assert len(out.outputs) == 3 and [o.index for o in out.outputs] == [0, 1, 2]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in again.outputs]
    assert len({o.token_ids for o in out.outputs}) > 1
    assert all(len(o.token_ids) == 12 for o in out.outputs)
    single = SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True)
    assert out.outputs[0].token_ids == llm.generate(TEXT_PROMPT, single,
                                                    use_tqdm=False)[0].token_ids


def _first_ascii_stop(text: str) -> tuple[int, str]:
    """A 3-character printable ASCII substring at its first occurrence, not at the start."""
    for i in range(1, len(text) - 3):
        s = text[i:i + 3]
        if s.isascii() and s.isprintable() and text.find(s) == i:
            return i, s
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings(llm, full_greedy):
    full = full_greedy.text
    index, stop = _first_ascii_stop(full)
    base = dict(max_tokens=40, temperature=0.0, ignore_eos=True)
    out = llm.generate(TEXT_PROMPT, SamplingParams(stop=[stop, "never-seen"], **base),
                       use_tqdm=False)[0]
    assert out.text == full[:index]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    k = len(out.token_ids)
    assert list(out.token_ids) == list(full_greedy.token_ids[:k]) and k < 40

    kept = llm.generate(TEXT_PROMPT, SamplingParams(stop=stop, include_stop_str_in_output=True,
                                                    **base), use_tqdm=False)[0]
    assert kept.text == full[:index + len(stop)] and kept.finish_reason == "stop"

    # The token that completes the stop string is also the last one max_tokens allows: the text
    # is cut at the stop string, so that is the reason reported.
    both = llm.generate(TEXT_PROMPT, SamplingParams(stop=stop, **{**base, "max_tokens": k}),
                        use_tqdm=False)[0]
    assert both.text == full[:index]
    assert both.finish_reason == "stop" and both.outputs[0].stop_reason == stop

    # Streaming never shows text past the cut.
    pieces = list(llm.stream(TEXT_PROMPT, SamplingParams(stop=stop, **base)))
    assert "".join(pieces) == full[:index]

    # Stop strings count only after min_tokens tokens (vLLM): the early one is generated through.
    late = llm.generate(TEXT_PROMPT, SamplingParams(stop=stop, min_tokens=k, **base),
                        use_tqdm=False)[0]
    assert late.text.startswith(full[:index + len(stop)]) and len(late.token_ids) > k


def test_stop_token_ids_and_min_tokens(llm, full_greedy):
    tokens = list(full_greedy.token_ids)
    stop_id = tokens[6]
    first = tokens.index(stop_id)
    base = dict(max_tokens=40, temperature=0.0, ignore_eos=True)
    out = llm.generate(TEXT_PROMPT, SamplingParams(stop_token_ids=[stop_id], **base),
                       use_tqdm=False)[0]
    assert list(out.token_ids) == tokens[:first + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_id

    floor = first + 3
    late = llm.generate(TEXT_PROMPT, SamplingParams(stop_token_ids=[stop_id], min_tokens=floor,
                                                    **base), use_tqdm=False)[0]
    assert len(late.token_ids) >= floor and stop_id not in late.token_ids[:floor]
    assert list(late.token_ids[:first]) == tokens[:first]


def test_max_tokens_finishes_with_length(llm):
    out = llm.generate(TEXT_PROMPT, SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.token_ids) == 7
    assert out.finish_reason == "length" and out.outputs[0].stop_reason is None


def test_context_length_finishes_with_length(tiny_hf_dir):
    short = LLM(model=str(tiny_hf_dir), max_model_len=24)
    ids = short.tokenizer.encode(PROMPTS[1])
    out = short.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=None,
                                                                   temperature=0.0,
                                                                   ignore_eos=True),
                         use_tqdm=False)[0]
    assert len(ids) + len(out.token_ids) == 24 and out.finish_reason == "length"


@pytest.fixture(scope="module")
def eos_case(llm):
    """A seed whose sampled output ends in EOS after a few tokens (searched, in one batch)."""
    params = [SamplingParams(max_tokens=24, temperature=1.0, seed=s) for s in range(64)]
    outs = llm.generate([PROMPTS[1]] * len(params), params, use_tqdm=False)
    for p, out in zip(params, outs):
        if out.finish_reason == "stop" and 4 <= len(out.token_ids) <= 20:
            return p, out
    pytest.fail("no seed in 0..63 samples EOS within 24 tokens")


def test_eos_ignore_eos_and_min_tokens(llm, eos_case):
    params, out = eos_case
    eos = set(llm.tokenizer.eos_token_ids)
    k = len(out.token_ids)
    assert out.token_ids[-1] in eos and out.outputs[0].stop_reason is None
    assert not eos & set(out.token_ids[:-1])

    ignored = llm.generate(PROMPTS[1], SamplingParams(max_tokens=24, temperature=1.0,
                                                      seed=params.seed, ignore_eos=True),
                           use_tqdm=False)[0]
    assert ignored.token_ids[:k] == out.token_ids  # the same draws, then past the EOS
    assert len(ignored.token_ids) == 24 and ignored.finish_reason == "length"

    floor = k + 2
    longer = llm.generate(PROMPTS[1], SamplingParams(max_tokens=24, temperature=1.0,
                                                     seed=params.seed, min_tokens=floor),
                          use_tqdm=False)[0]
    assert len(longer.token_ids) >= floor
    assert not eos & set(longer.token_ids[:floor])
    assert longer.token_ids[:k - 1] == out.token_ids[:k - 1]


def test_logprobs(llm, prompt_ids):
    k = 5
    out = llm.generate({"prompt_token_ids": prompt_ids[1]},
                       SamplingParams(max_tokens=8, temperature=0.0, logprobs=k, ignore_eos=True),
                       use_tqdm=False)[0]
    logprobs = out.outputs[0].logprobs
    assert len(logprobs) == len(out.token_ids) == 8
    for token_id, (chosen, top) in zip(out.token_ids, logprobs):
        assert len(top) == k
        assert all(v <= 0.0 for v in top.values()) and chosen <= 0.0
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-5
        best = max(top, key=top.get)
        assert best == token_id and chosen == pytest.approx(top[best], abs=1e-6)
    # The first position against log_softmax of the dense reference's logits.
    ref = prompt_logits(llm.engine.model, prompt_ids[1]).log_softmax(-1).topk(k)
    chosen, top = logprobs[0]
    assert list(top) == ref.indices.tolist()
    assert list(top.values()) == pytest.approx(ref.values.tolist(), abs=1e-4)

    sampled = llm.generate(TEXT_PROMPT, SamplingParams(max_tokens=6, temperature=1.0, seed=5,
                                                       logprobs=0, ignore_eos=True),
                           use_tqdm=False)[0]
    assert len(sampled.outputs[0].logprobs) == len(sampled.token_ids) == 6
    for chosen, top in sampled.outputs[0].logprobs:
        assert top == {} and chosen <= 0.0


def all_position_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the dense reference's logits at every position: [len(ids), vocab]."""
    n = len(ids)
    return model.forward(torch.tensor(ids), torch.arange(n), NoCacheAttention(model.spec),
                         AttentionMetadata.single("ref", n), torch.arange(n)).log_softmax(-1)


@pytest.mark.parametrize("chunk", [None, 16])
def test_prompt_logprobs_match_dense_reference(tiny_hf_dir, prompt_ids, chunk):
    """Every prompt token scored by the model as it reads the prompt (echo + logprobs), across
    chunked prefill, and never taken from the prefix cache (a cached position was not scored)."""
    llm = LLM(model=str(tiny_hf_dir), cache_mode="paged", block_size=4, kv_cache_memory="4MiB",
              max_num_batched_tokens=chunk or 2048)
    ids = prompt_ids[3]
    ref = all_position_logprobs(llm.engine.model, ids)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3, ignore_eos=True)
    for _ in range(2):  # the second run would be a full prefix-cache hit
        out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
        assert out.num_cached_tokens == 0
        scores = out.prompt_logprobs
        assert len(scores) == len(ids) and scores[0] is None
        for i in range(1, len(ids)):
            chosen, top = scores[i]
            assert chosen == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
            expected = ref[i - 1].topk(3)
            assert list(top) == expected.indices.tolist()
            assert list(top.values()) == pytest.approx(expected.values.tolist(), abs=1e-4)
    plain = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert plain[0].prompt_logprobs is None and plain[0].num_cached_tokens > 0
