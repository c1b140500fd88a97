"""A hybrid model (three windowed layers and two with full attention, a tiny Mistral with
layer_types) in the paged engine: a block table per KV group over one pool of two-layer blocks.
The windowed groups' blocks before the window go back to the pool during decode (ids checked after
every step) while the full group keeps all of its own; a budget too small for one table of every
layer runs the whole length; and the tokens equal the dense no-cache run with the window masks,
through chunked prompts, prefix hits, swap and recompute preemption."""

from __future__ import annotations

import fixtures
import pytest

from kvserve import LLM, SamplingParams
from kvserve.errors import ConfigError
from kvserve.kvcache.block_manager import HOLE

BS, WINDOW = 4, 8
TYPES = (1, 1, 1, 0, 0)  # 1: a sliding-window layer
LAYER_BLOCK = 2 * 2 * 16 * 4 * BS  # K and V of one block in one layer (2 heads of 16, float32)
GREEDY = SamplingParams(max_tokens=90, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [(13 * i + 3 * j) % 200 + 10 for j in range(n)]}
           for i, n in enumerate([21, 6, 11])]


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    return fixtures.write_tiny_hybrid(tmp_path_factory.mktemp("hybrid") / "tiny-hybrid", TYPES,
                                      WINDOW)


@pytest.fixture(scope="module")
def reference(hybrid_dir):
    llm = LLM(model=str(hybrid_dir), cache_mode="none")
    return [list(o.token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_the_groups_and_their_pages(hybrid_dir):
    engine = LLM(model=str(hybrid_dir), block_size=BS, max_model_len=128,
                 max_num_batched_tokens=8, kv_cache_memory=LAYER_BLOCK * 2 * 50).engine
    assert engine.spec.layer_windows == (8, 8, 8, 0, 0)
    groups = engine.block_manager.groups
    assert [(g.policy.name, g.num_layers) for g in groups] == [
        ("full", 2), ("sliding-window", 2), ("sliding-window", 1)]
    store = engine.runner.kv_store
    assert store.keys(0).shape[0] == engine.block_manager.pool.num_blocks == 50
    assert store.parts["k.kv"].shape[:2] == (2, 50)  # a block: one block of tokens, 2 layers
    assert engine.runner.num_kv_bytes_allocated() == 50 * 2 * LAYER_BLOCK
    # layer 3 (full, first of its group) and layer 0 (windowed, first of its) share row 0
    assert store.keys(3).data_ptr() == store.keys(0).data_ptr()


def test_windowed_groups_release_blocks_the_full_group_keeps(hybrid_dir, reference):
    llm = LLM(model=str(hybrid_dir), block_size=BS, max_model_len=128,
              max_num_batched_tokens=8, enable_prefix_caching=False)
    engine = llm.engine
    manager, pool = engine.block_manager, engine.block_manager.pool
    engine.add_request("a", PROMPTS[0]["prompt_token_ids"], GREEDY)
    seen: dict[tuple[int, int], int] = {}
    released = 0
    while engine.has_unfinished_requests():
        engine.step()
        if "a" not in manager.tables:
            break
        r = engine.requests["a"]
        tables = [manager.block_ids("a"), *map(list, manager.group_block_ids("a"))]
        assert HOLE not in tables[0]  # full attention reads every block
        first = manager.groups[1].policy.released_blocks(r.num_computed_tokens, BS).stop
        for g, table in enumerate(tables[1:], 1):
            assert table[:first] == [HOLE] * first and HOLE not in table[first:]
            for i, b in enumerate(table):  # a block released this step is free now
                if b == HOLE and (g, i) in seen:
                    assert pool.ref_counts[seen.pop((g, i))] == 0
                    released += 1
                elif b != HOLE:
                    seen[(g, i)] = b
        assert pool.num_used_blocks == len(tables[0]) + 2 * (len(tables[0]) - first)
        assert len(tables[0]) - first <= 4  # the window's keys and the next query's
    assert released >= 2 * 20  # 111 tokens: 28 blocks a table, all but a few released
    assert list(engine.pop_finished("a").output_token_ids) == reference[0]


def test_a_budget_one_table_cannot_fit_runs_the_whole_length(hybrid_dir, reference):
    """128 tokens are 32 blocks: one table of all five layers needs 32 x 5 = 160 layer-blocks;
    the groups need 32 x 2 for the full layers and at most 5 x 2 blocks of 2 layers for the
    windowed ones (the window, a step and a block): 84. A 45-block pool (90 layer-blocks)."""
    llm = LLM(model=str(hybrid_dir), block_size=BS, max_model_len=128,
              kv_cache_memory=LAYER_BLOCK * 2 * 45, max_num_batched_tokens=8, max_num_seqs=1,
              enable_prefix_caching=False)
    long = SamplingParams(max_tokens=128 - 21, temperature=0.0, ignore_eos=True)
    out = llm.generate(PROMPTS[:1], long, use_tqdm=False)[0]
    assert len(out.token_ids) == 107 and list(out.token_ids)[:90] == reference[0]
    assert llm.engine.peak_blocks_used <= 45
    with pytest.raises(ConfigError, match="raise kv_cache_memory"):
        LLM(model=str(hybrid_dir), block_size=BS, max_model_len=128, max_num_batched_tokens=8,
            kv_cache_memory=LAYER_BLOCK * 2 * 40)


@pytest.mark.parametrize("settings", [
    dict(block_size=BS, max_num_batched_tokens=8),
    dict(block_size=BS, max_num_batched_tokens=5),  # chunked prompts across the window
    dict(block_size=BS, max_num_batched_tokens=8, enable_prefix_caching=True),
    dict(block_size=BS, enable_prefix_caching=True, max_num_batched_tokens=8,
         kv_cache_memory=LAYER_BLOCK * 2 * 60),  # cached blocks evicted while others run
])
def test_hybrid_tokens_equal_the_dense_masked_reference(hybrid_dir, reference, settings):
    llm = LLM(model=str(hybrid_dir), max_model_len=128, **settings)
    assert len(llm.engine.block_manager.groups) == 3
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [list(o.token_ids) for o in outs] == reference
    if settings.get("enable_prefix_caching"):  # the same prompts again: hits, same tokens
        again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [list(o.token_ids) for o in again] == reference
        if "kv_cache_memory" not in settings:  # nothing was evicted
            assert sum(o.num_cached_tokens for o in again) > 0
        llm.engine.block_manager.check_invariants()


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_keeps_every_groups_tokens(hybrid_dir, reference, mode):
    """Three 111-token sequences in a 70-block pool (each needs 28 full blocks and 2 x 5 for
    its windows at most): all three at once do not fit; a swapped sequence comes back with each
    table's holes where they were."""
    llm = LLM(model=str(hybrid_dir), block_size=BS, max_model_len=128, preemption_mode=mode,
              kv_cache_memory=LAYER_BLOCK * 2 * 70, max_num_seqs=3, max_num_batched_tokens=8,
              enable_prefix_caching=False)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.engine.cache_snapshot().num_preemptions > 0
    assert [list(o.token_ids) for o in outs] == reference


def test_groups_only_where_they_hold_less(tmp_path):
    """A window longer than any sequence releases nothing, and the groups' padding row (3
    windowed layers in groups of 2) would cost a sixth more per token: one table, and a pool of
    33 one-table blocks still runs a 121-token sequence, as it did before groups."""
    folder = fixtures.write_tiny_hybrid(tmp_path / "h", TYPES, window=200)
    llm = LLM(model=str(folder), block_size=BS, max_model_len=128, max_num_batched_tokens=8,
              kv_cache_memory=LAYER_BLOCK * 5 * 33, enable_prefix_caching=False)
    assert len(llm.engine.block_manager.groups) == 1
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=100, temperature=0.0,
                                                   ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 100
    # steps as long as the context: a windowed group could hold every block at once
    steps = LLM(model=str(fixtures.write_tiny_hybrid(tmp_path / "s", TYPES)), block_size=BS,
                max_model_len=128, max_num_batched_tokens=128)
    assert len(steps.engine.block_manager.groups) == 1


def test_residual_windows_and_offload_keep_one_table(hybrid_dir):
    """int8 K/V's residual windows and the offload tiers are planned per table: they run the
    hybrid model with one table of every layer (what stays in the pool: every block)."""
    for settings in (dict(kv_cache_dtype="int8", kv_residual_tokens=4),
                     dict(enable_prefix_caching=True, cpu_offload_memory=LAYER_BLOCK * 5 * 64)):
        engine = LLM(model=str(hybrid_dir), block_size=BS, max_model_len=128, **settings).engine
        assert len(engine.block_manager.groups) == 1
        assert engine.block_manager.policy.name == "full"


def test_five_local_to_one_global_holds_a_fraction_of_one_table(tmp_path):
    """Gemma 3's 5 : 1 shape (six one-layer groups): a 200-token sequence holds its 50 blocks
    in the full layer and at most 5 in each windowed one, 75 layer-blocks at the peak where one
    table of every layer would hold 300 (a quarter; a sixth as sequences grow)."""
    folder = fixtures.write_tiny_hybrid(tmp_path / "g3", (1, 1, 1, 1, 1, 0))
    llm = LLM(model=str(folder), block_size=BS, max_model_len=256, max_num_batched_tokens=8,
              enable_prefix_caching=False)
    engine = llm.engine
    assert len(engine.block_manager.groups) == 6
    params = SamplingParams(max_tokens=200 - 21, temperature=0.0, ignore_eos=True)
    out = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
    assert len(out.token_ids) == 179
    assert engine.peak_blocks_used <= 50 + 5 * 5
    dense = LLM(model=str(folder), cache_mode="none").generate(PROMPTS[:1], params,
                                                               use_tqdm=False)[0]
    assert list(out.token_ids) == list(dense.token_ids)


def test_a_requests_blocks_and_bytes_count_every_table(hybrid_dir):
    """The per-request block count (metrics, --stats) is the pool blocks it held across its
    tables, and a pool block's bytes are the group's layers', not every layer's."""
    from kvserve.bench.cache_lab import kv_held

    llm = LLM(model=str(hybrid_dir), block_size=BS, max_model_len=128, max_num_batched_tokens=8,
              enable_prefix_caching=False)
    engine = llm.engine
    out = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]
    kv = engine.cache_snapshot()
    assert kv.bytes_per_block == 2 * LAYER_BLOCK  # two layers a block
    assert out.metrics["num_blocks"] == engine.peak_blocks_used  # alone: its own peak
    assert kv_held(engine, kv.bytes_per_block) == (engine.peak_blocks_used * 2 * LAYER_BLOCK,
                                                   engine.peak_blocks_used)
    assert kv.num_bytes_allocated == kv.pool.num_blocks * kv.bytes_per_block
