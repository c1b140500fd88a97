"""A model whose every layer has a sliding window (a tiny Mistral) in the paged engine: blocks
before the window go back to the pool during decode (their ids checked against the pool after
every step), the sequence never holds more than the window's blocks, and the tokens equal the
dense no-cache run with the window mask and the contiguous cache, through swap and recompute
preemption and with prefix caching."""

from __future__ import annotations

import json

import fixtures
import pytest

from kvserve import LLM, SamplingParams
from kvserve.kvcache.block_manager import HOLE

BS, WINDOW = 4, 8
BYTES_PER_BLOCK = 2 * 2 * 2 * 16 * 4 * BS  # tiny model (2 layers, 2 K/V heads of 16), float32
GREEDY = SamplingParams(max_tokens=90, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [(13 * i + 3 * j) % 200 + 10 for j in range(n)]}
           for i, n in enumerate([21, 6, 11])]


@pytest.fixture(scope="module")
def mistral_dir(tiny_hf_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral") / "tiny-mistral"
    folder.mkdir()
    for f in tiny_hf_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral",
                  sliding_window=WINDOW)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def reference(mistral_dir):
    llm = LLM(model=str(mistral_dir), cache_mode="none")
    return [list(o.token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_blocks_before_the_window_go_back_to_the_pool(mistral_dir, reference):
    llm = LLM(model=str(mistral_dir), block_size=BS, max_model_len=128,
              enable_prefix_caching=False)
    engine = llm.engine
    manager, pool = engine.block_manager, engine.block_manager.pool
    assert manager.policy.name == "sliding-window" and manager.policy.window == WINDOW
    engine.add_request("a", PROMPTS[0]["prompt_token_ids"], GREEDY)
    released = []
    for r, table, now in fixtures.released_per_step(engine, "a"):
        released += now  # released this step: exactly the blocks those indices held
        assert all(pool.ref_counts[b] == 0 for b in now)
        first = manager.policy.released_blocks(r.num_computed_tokens, BS).stop
        assert table[:first] == [HOLE] * first and HOLE not in table[first:]
        # the window's keys (and the next query's) span at most 4 blocks of 4 here
        assert pool.num_used_blocks == len(table) - first <= 4
    assert len(released) >= 20  # 21 + 90 tokens = 28 blocks, all but the last few released
    assert list(engine.pop_finished("a").output_token_ids) == reference[0]
    assert engine.peak_blocks_used <= 6  # the 21-token prompt's blocks, before its release


@pytest.mark.parametrize("settings", [
    dict(cache_mode="contiguous"),
    dict(block_size=BS),
    dict(block_size=BS, max_num_batched_tokens=5),  # chunked prompts across the window
    dict(block_size=BS, enable_prefix_caching=True),
    dict(block_size=BS, kv_cache_dtype="int8", kv_residual_tokens=4),
    # a 6-block pool: cached blocks are evicted to the host tier and come back from it
    dict(block_size=BS, enable_prefix_caching=True, cpu_offload_memory=BYTES_PER_BLOCK * 64,
         kv_cache_memory=BYTES_PER_BLOCK * 12, max_num_batched_tokens=8),
])
def test_windowed_tokens_equal_the_dense_masked_reference(mistral_dir, reference, settings):
    llm = LLM(model=str(mistral_dir), max_model_len=128, **settings)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    if settings.get("kv_cache_dtype") == "int8":  # codes: close, not equal
        agree = sum(a == b for o, ref in zip(outs, reference)
                    for a, b in zip(o.token_ids, ref)) / sum(map(len, reference))
        assert agree > 0.5
        return
    assert [list(o.token_ids) for o in outs] == reference
    if settings.get("enable_prefix_caching"):  # the same prompts again: hits, same tokens
        again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [list(o.token_ids) for o in again] == reference
        assert sum(o.num_cached_tokens for o in again) > 0


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_keeps_the_windowed_tokens(mistral_dir, reference, mode):
    """A pool of 6 blocks for three 111-token sequences (28 blocks each without the window):
    the window and one 8-token step fit in it, all three at once do not: preemption, and a
    swapped sequence comes back with its holes where they were."""
    llm = LLM(model=str(mistral_dir), block_size=BS, max_model_len=128, preemption_mode=mode,
              kv_cache_memory=BYTES_PER_BLOCK * 6, max_num_seqs=3, max_num_batched_tokens=8,
              enable_prefix_caching=False)
    assert llm.engine.block_manager.pool.num_blocks == 6
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.engine.cache_snapshot().num_preemptions > 0
    assert [list(o.token_ids) for o in outs] == reference


def test_a_pool_smaller_than_the_window_and_a_step_is_refused(mistral_dir):
    from kvserve.errors import ConfigError

    with pytest.raises(ConfigError, match=r"its 8-token window and a step of 8 tokens"):
        LLM(model=str(mistral_dir), block_size=BS, max_model_len=128,
            kv_cache_memory=BYTES_PER_BLOCK * 4, max_num_batched_tokens=8)
