"""The host tier below the paged pool on the tiny model: prefixes evicted from a small pool come
back from host memory with outputs identical to a run without offload (greedy and seeded, float
and quantized K/V, with swap preemption sharing the tier); a tier the cost model finds slow is
recomputed instead; tenants never meet; the counters reach the cache snapshot."""

import pytest

from kvserve import LLM, SamplingParams
from kvserve.errors import ConfigError
from kvserve.kvcache.layout import KVLayout
from kvserve.model.loader import load_checkpoint

BLOCK = 4
MAX_LEN = 64
PREFIX = [(13 * j) % 150 + 30 for j in range(40)]  # ten full blocks
FILLERS = [[(7 * i + 5 * j) % 170 + 20 for j in range(44)] for i in range(3)]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)


def prompt(ids, salt=None):
    return {"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}


def make(tiny_hf_dir, kv="float32", **kwargs) -> LLM:
    """A pool of 16 blocks: one max-length request, so each filler evicts the prefix."""
    kwargs = {"block_size": BLOCK, "max_model_len": MAX_LEN, "max_num_seqs": 2,
              "kv_cache_dtype": kv, **({"kv_residual_tokens": 8} if kv != "float32" else {}),
              **kwargs}
    layout = KVLayout(load_checkpoint(str(tiny_hf_dir)).spec, BLOCK, kv,
                      residual_seqs=kwargs["max_num_seqs"],
                      window_tokens=kwargs.get("kv_residual_tokens", 0))
    return LLM(model=str(tiny_hf_dir), kv_cache_memory=16 * layout.bytes_per_block
               + layout.fixed_bytes, **kwargs)


def turns(llm, params, salt=None):
    """The prefix with a question, three fillers that push it out of the pool, the prefix again
    with another question: the last output and its cached tokens."""
    gen = llm.generate
    gen(prompt(PREFIX + [1, 2], salt), params, use_tqdm=False)
    for f in FILLERS:
        gen(prompt(f), params, use_tqdm=False)
    out = gen(prompt(PREFIX + [3, 4, 5], salt), params, use_tqdm=False)[0]
    return out.token_ids, out.num_cached_tokens


@pytest.mark.parametrize("kv", ["float32", "int8"])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_evicted_prefix_comes_back_from_host_memory_with_identical_outputs(tiny_hf_dir, kv,
                                                                           params):
    plain = make(tiny_hf_dir, kv)
    expected, cached = turns(plain, params)
    assert cached == 0  # the pool alone lost the prefix to the fillers
    reference = make(tiny_hf_dir, kv, enable_prefix_caching=False)
    assert reference.generate(prompt(PREFIX + [3, 4, 5]), params,
                              use_tqdm=False)[0].token_ids == expected
    tiered = make(tiny_hf_dir, kv, cpu_offload_memory="1MiB")
    got, cached = turns(tiered, params)
    assert got == expected and cached == 40  # ten blocks fetched back
    tier = tiered.engine.cache_snapshot().tiers[0]
    c = tier.counters
    assert tier.name == "host" and c.num_fetched_blocks == 10 and c.num_fetch_decisions >= 1
    assert c.num_stored_blocks >= 10 and c.num_bytes_out == 10 * tiered.engine.block_manager \
        .lower.block_bytes and c.expected_saved_s > 0
    assert tiered.engine.cache_snapshot().pool.num_used_blocks == 0
    tiered.engine.block_manager.check_invariants()


def test_a_slow_tier_is_recomputed_with_the_same_outputs(tiny_hf_dir, monkeypatch):
    expected, _ = turns(make(tiny_hf_dir), GREEDY)
    tiered = make(tiny_hf_dir, cpu_offload_memory="1MiB")
    rate = tiered.engine.block_manager.lower.rates["host"]
    rate.bytes_per_s = 1.0  # as if the copies crawled (and kept crawling): recomputing wins
    monkeypatch.setattr(rate, "observe", lambda num_bytes, seconds: None)
    got, cached = turns(tiered, GREEDY)
    assert got == expected and cached == 0
    c = tiered.engine.cache_snapshot().tiers[0].counters
    assert c.num_recompute_decisions >= 1 and c.num_recomputed_blocks >= 10
    assert c.num_fetched_blocks == 0


def test_tenants_never_meet_in_the_host_tier(tiny_hf_dir):
    tiered = make(tiny_hf_dir, cpu_offload_memory="1MiB")
    _, cached = turns(tiered, GREEDY, salt="alice")
    assert cached == 40
    out = tiered.generate(prompt(PREFIX + [3, 4, 5], "bob"), GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # the same tokens under another salt


def test_swap_preemption_shares_the_host_tier(tiny_hf_dir):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = [prompt(PREFIX[:30] + [i]) for i in range(3)]
    reference = make(tiny_hf_dir, enable_prefix_caching=False, max_num_seqs=3)
    expected = [o.token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    tiered = make(tiny_hf_dir, cpu_offload_memory="1MiB", preemption_mode="swap",
                  max_num_seqs=3)
    assert [o.token_ids for o in tiered.generate(prompts, params, use_tqdm=False)] == expected
    snap = tiered.engine.cache_snapshot()
    assert snap.num_preemptions > 0 and snap.tiers[0].num_parked_blocks == 0
    assert not tiered.engine.runner.host_blocks.owned  # swap copies all returned


def test_offload_needs_the_paged_prefix_cache(tiny_hf_dir):
    with pytest.raises(ConfigError, match="prefix caching"):
        make(tiny_hf_dir, cpu_offload_memory="1MiB", enable_prefix_caching=False)
    with pytest.raises(ConfigError, match="cpu_offload_memory"):
        make(tiny_hf_dir, cpu_offload_memory="lots")
