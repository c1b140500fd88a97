"""Paged cache under memory pressure: a pool so small that requests must be preempted, by
recompute and by swap, still gives exactly the outputs of an unconstrained run; chunked prefill
gives the same tokens as whole-prompt prefill; nothing leaks."""

import pytest

from kvserve import LLM, SamplingParams
from kvserve.errors import ConfigError, InvalidRequestError

BLOCK = 4
MAX_LEN = 48
BYTES_PER_BLOCK = 2 * 2 * 2 * 16 * 4 * BLOCK  # tiny model, float32: 256 bytes a token
# Token ids (lengths 10, 1, 14, 5, 8) so the sizes do not depend on the tiny tokenizer.
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 200 + 10 for j in range(n)]}
           for i, n in enumerate([10, 1, 14, 5, 8])]


def run(llm: LLM, params) -> list[tuple[int, ...]]:
    return [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def unconstrained(tiny_hf_dir):
    return LLM(model=str(tiny_hf_dir), block_size=BLOCK, max_model_len=MAX_LEN, max_num_seqs=8)


PARAMS = [
    SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
    [SamplingParams(max_tokens=30, temperature=1.0, seed=i, ignore_eos=True) for i in range(5)],
]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded"])
def test_preemption_gives_the_unconstrained_outputs(tiny_hf_dir, unconstrained, mode, params):
    expected = run(unconstrained, params)
    assert unconstrained.engine.cache_snapshot().num_preemptions == 0
    # 13 blocks: one max-length request (12) fits; the five requests (up to 44 tokens, 11 blocks
    # each) cannot all run at once.
    tight = LLM(model=str(tiny_hf_dir), block_size=BLOCK, max_model_len=MAX_LEN,
                kv_cache_memory=13 * BYTES_PER_BLOCK, max_num_seqs=8, preemption_mode=mode,
                max_num_batched_tokens=16)
    assert tight.engine.block_manager.pool.num_blocks == 13
    assert run(tight, params) == expected
    stats = tight.engine.cache_snapshot()
    assert stats.num_preemptions > 0
    assert stats.pool.num_used_blocks == 0 and stats.pool.peak_used_blocks <= 13
    tight.engine.block_manager.check_invariants()
    assert not tight.engine.runner.host_blocks  # every swapped copy came back or was dropped


def test_chunked_prefill_matches_whole_prefill(tiny_hf_dir, unconstrained):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    chunked = LLM(model=str(tiny_hf_dir), block_size=BLOCK, max_model_len=MAX_LEN,
                  max_num_batched_tokens=3)
    assert run(chunked, params) == run(unconstrained, params)


def test_requests_that_can_never_fit_are_rejected_up_front(tiny_hf_dir):
    llm = LLM(model=str(tiny_hf_dir), block_size=BLOCK, max_model_len=MAX_LEN)
    with pytest.raises(InvalidRequestError, match="exceeds max_model_len"):
        llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=MAX_LEN),
                     use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, match", [
    ({"block_size": 12}, "block_size must be a power of two"),
    ({"block_size": 512}, "block_size must be a power of two"),
    ({"kv_cache_memory": 4 * BYTES_PER_BLOCK}, "kv_cache_memory"),
    ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ({"preemption_mode": "drop"}, "preemption_mode"),
])
def test_bad_cache_settings_fail_at_start_up_naming_the_setting(tiny_hf_dir, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LLM(model=str(tiny_hf_dir), max_model_len=MAX_LEN, **{"block_size": BLOCK, **kwargs})


def test_capacity_limits_name_the_limit_and_its_value(tiny_hf_dir):
    llm = LLM(model=str(tiny_hf_dir), block_size=BLOCK, max_model_len=MAX_LEN,
              max_input_tokens=6, max_output_tokens=8)
    with pytest.raises(InvalidRequestError, match=r"max_input_tokens limit \(6\)"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match=r"max_output_tokens limit \(8\)"):
        llm.generate(PROMPTS[3], SamplingParams(max_tokens=9), use_tqdm=False)
    assert len(llm.generate(PROMPTS[3], SamplingParams(max_tokens=8, ignore_eos=True),
                            use_tqdm=False)[0].token_ids) == 8


def test_long_requests_run_at_most_max_long_requests_at_once(tiny_hf_dir, unconstrained):
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    llm = LLM(model=str(tiny_hf_dir), block_size=BLOCK, max_model_len=MAX_LEN,
              max_long_requests=1, long_context_threshold=36)
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p["prompt_token_ids"], params)
    most_long = 0
    while engine.has_unfinished_requests():
        engine.step()
        most_long = max(most_long, sum(engine.scheduler.is_long(r)
                                       for r in engine.scheduler.running))
    assert most_long == 1  # prompts of 10 and 14 tokens + 30 > 36: never together
    outs = [engine.pop_finished(str(i)).output_token_ids for i in range(len(PROMPTS))]
    assert [tuple(o) for o in outs] == run(unconstrained, params)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_prompt_logprobs_survive_preemption(tiny_hf_dir, unconstrained, mode):
    """Each prompt token is scored once, however often its request is preempted and resumed."""
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    expected = [o.prompt_logprobs for o in unconstrained.generate(PROMPTS, params,
                                                                   use_tqdm=False)]
    tight = LLM(model=str(tiny_hf_dir), block_size=BLOCK, max_model_len=MAX_LEN,
                kv_cache_memory=13 * BYTES_PER_BLOCK, max_num_seqs=8, preemption_mode=mode,
                max_num_batched_tokens=4)
    outs = tight.generate(PROMPTS, params, use_tqdm=False)
    assert tight.engine.cache_snapshot().num_preemptions > 0
    for out, ref, prompt in zip(outs, expected, PROMPTS):
        scores = out.prompt_logprobs
        assert len(scores) == len(prompt["prompt_token_ids"]) and scores[0] is None
        for got, want in zip(scores[1:], ref[1:]):
            assert got[0] == pytest.approx(want[0], abs=1e-4)
            assert list(got[1]) == list(want[1])
