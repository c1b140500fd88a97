"""Automatic prefix caching on the tiny model: outputs equal to a run without it, hits reported per
output and in the engine's counters, salts kept apart, eviction under pressure, n > 1 samples and
multi-turn conversations sharing blocks, and every reference returned at the end."""

import pytest

from kvserve import LLM, SamplingParams
from kvserve.engine.llm import _prompt_of
from kvserve.errors import InvalidRequestError

BLOCK = 4
BYTES_PER_BLOCK = 2 * 2 * 2 * 16 * 4 * BLOCK  # tiny model, float32: 256 bytes a token
SYSTEM = [(11 * j) % 190 + 20 for j in range(22)]  # a shared 22-token "system prompt"
QUESTIONS = [[(5 * i + 3 * j) % 180 + 15 for j in range(3 + i % 4)] for i in range(6)]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def prompt(ids, salt=None):
    return {"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}


def make(tiny_hf_dir, **kwargs) -> LLM:
    kwargs = {"block_size": BLOCK, "max_model_len": 64, **kwargs}
    return LLM(model=str(tiny_hf_dir), **kwargs)


@pytest.fixture(scope="module")
def reference(tiny_hf_dir):
    """Outputs of each system+question prompt, without prefix caching."""
    llm = make(tiny_hf_dir, enable_prefix_caching=False)
    params = [GREEDY, SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)]
    return {i: [llm.generate(prompt(SYSTEM + q), p, use_tqdm=False)[0].token_ids for p in params]
            for i, q in enumerate(QUESTIONS)}


def test_outputs_equal_a_run_without_prefix_caching(tiny_hf_dir, reference):
    llm = make(tiny_hf_dir)
    params = [GREEDY, SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)]
    for i, q in enumerate(QUESTIONS):  # one at a time: each after the first hits the system
        for p, expected in zip(params, reference[i]):
            assert llm.generate(prompt(SYSTEM + q), p, use_tqdm=False)[0].token_ids == expected
    # and all at once (the first computes the shared blocks, the rest wait a step and reuse them)
    outs = llm.generate([prompt(SYSTEM + q) for q in QUESTIONS], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [reference[i][0] for i in range(len(QUESTIONS))]
    stats = llm.engine.cache_snapshot()
    assert stats.prefix.num_hit_tokens > 0 and stats.pool.num_used_blocks == 0
    assert not any(llm.engine.block_manager.pool.ref_counts)
    llm.engine.block_manager.check_invariants()


def test_second_identical_prompt_reports_its_full_block_prefix(tiny_hf_dir):
    llm = make(tiny_hf_dir)
    ids = SYSTEM + QUESTIONS[0]  # 25 tokens: 6 full blocks
    first = llm.generate(prompt(ids), GREEDY, use_tqdm=False)[0]
    second = llm.generate(prompt(ids), GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 24 and second.token_ids == first.token_ids
    exact = SYSTEM[:20]  # exactly 5 blocks, all cached: the last is still computed (its logits)
    for _ in range(2):
        assert llm.generate(prompt(exact), GREEDY, use_tqdm=False)[0].num_cached_tokens == 16
    stats = llm.engine.cache_snapshot().prefix
    assert stats.num_queried_tokens == 25 + 25 + 20 + 20
    assert stats.num_hit_tokens == 24 + 16 + 16
    assert stats.hit_rate == pytest.approx(56 / 90)
    assert stats.num_cached_blocks >= 6


def test_salts_never_share_blocks(tiny_hf_dir, reference):
    llm = make(tiny_hf_dir)
    ids = SYSTEM + QUESTIONS[1]
    llm.generate(prompt(ids, "tenant-a"), GREEDY, use_tqdm=False)
    other = llm.generate(prompt(ids, "tenant-b"), GREEDY, use_tqdm=False)[0]
    shared = llm.generate(prompt(ids), GREEDY, use_tqdm=False)[0]
    same = llm.generate(prompt(ids, "tenant-a"), GREEDY, use_tqdm=False)[0]
    assert other.num_cached_tokens == 0 and shared.num_cached_tokens == 0
    assert same.num_cached_tokens == 24
    assert other.token_ids == shared.token_ids == same.token_ids == reference[1][0]
    with pytest.raises(InvalidRequestError, match="cache_salt must be a non-empty string"):
        llm.generate({"prompt_token_ids": ids, "cache_salt": ""}, GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="cache_salt must be a non-empty string"):
        llm.generate({"prompt_token_ids": ids, "cache_salt": 7}, GREEDY, use_tqdm=False)


def test_eviction_under_pressure_keeps_outputs_correct(tiny_hf_dir, reference):
    # 24 blocks: room for a few requests' blocks at once, so cached blocks must be evicted
    llm = make(tiny_hf_dir, kv_cache_memory=24 * BYTES_PER_BLOCK, max_num_seqs=3)
    for _ in range(2):
        outs = llm.generate([prompt(SYSTEM + q, f"t{i % 3}") for i, q in enumerate(QUESTIONS)],
                            GREEDY, use_tqdm=False)
        assert [o.token_ids for o in outs] == [reference[i][0] for i in range(len(QUESTIONS))]
    stats = llm.engine.cache_snapshot()
    assert stats.prefix.num_evictions > 0 and stats.prefix.num_hit_tokens > 0
    assert stats.pool.num_used_blocks == 0 and not any(llm.engine.block_manager.pool.ref_counts)
    assert stats.events.num_evicted == stats.prefix.num_evictions
    llm.engine.block_manager.check_invariants()


def test_eviction_takes_the_least_recently_used_tail_first(tiny_hf_dir):
    llm = make(tiny_hf_dir, kv_cache_memory=16 * BYTES_PER_BLOCK, max_model_len=64)
    cache = llm.engine.block_manager.prefix_index
    a = [(3 * j) % 150 + 30 for j in range(13)]  # 3 full blocks (cached) + 1 partial
    b = [(7 * j) % 150 + 31 for j in range(13)]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.generate(prompt(a), params, use_tqdm=False)  # a's 4 blocks freed tail first
    llm.generate(prompt(b), params, use_tqdm=False)  # b's 4 from the 12 never used; freed after
    assert cache.num_cached_blocks == 6 and cache.num_evictions == 0
    # c's 10 blocks: the 8 never used, then a's partial tail block and a's last full block
    c = [(5 * j) % 150 + 32 for j in range(37)]
    llm.generate(prompt(c), SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    assert cache.num_evictions == 1 and cache.num_cached_blocks == 6 - 1 + 9
    assert llm.generate(prompt(a), params, use_tqdm=False)[0].num_cached_tokens == 8


def test_n_samples_share_the_prompt_blocks(tiny_hf_dir):
    llm = make(tiny_hf_dir)
    ids = SYSTEM + QUESTIONS[2]  # 27 tokens: 6 full blocks
    params = SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    _, samples = llm._add(_prompt_of(prompt(ids)), params)
    peak = 0
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        peak = max(peak, llm.engine.block_manager.pool.num_used_blocks)
    assert [r.num_cached_tokens for r in samples] == [0, 24, 24, 24]
    # K/V for 27 + 5 tokens = 8 blocks a sample: the 6 shared prompt blocks once, then 2 of its
    # own each (32 blocks without sharing)
    assert peak == 8 + 3 * 2


def test_multi_turn_chat_reuses_the_previous_turn_and_its_reply(tiny_hf_dir):
    """Each turn's prompt is the last turn's prompt + its reply + a new message (token level, as
    a chat template renders a conversation): the reply's blocks are reused too."""
    llm = make(tiny_hf_dir, max_model_len=128)
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    ids, prev_prompt_len, reused = SYSTEM[:10], 0, 0
    for turn in range(4):
        out = llm.generate(prompt(ids), params, use_tqdm=False)[0]
        if turn:
            # K/V exists for everything but the last reply token: all its full blocks are hit
            assert out.num_cached_tokens == (reused // BLOCK) * BLOCK
            assert out.num_cached_tokens > prev_prompt_len  # the reply's blocks count too
        prev_prompt_len = len(ids)
        reused = len(ids) + len(out.token_ids) - 1
        ids = ids + list(out.token_ids) + QUESTIONS[turn]


def test_reset_prefix_cache_forgets_everything(tiny_hf_dir):
    llm = make(tiny_hf_dir)
    ids = SYSTEM + QUESTIONS[3]
    llm.generate(prompt(ids), GREEDY, use_tqdm=False)
    assert llm.reset_prefix_cache() is True
    assert llm.engine.cache_snapshot().prefix.num_cached_blocks == 0
    assert llm.generate(prompt(ids), GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
    off = make(tiny_hf_dir, enable_prefix_caching=False)
    assert off.reset_prefix_cache() is False
    assert off.engine.cache_snapshot().prefix is None
