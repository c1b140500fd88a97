"""The host tier below the paged pool on the tiny model: prefixes evicted from a small pool come
back from host memory with outputs identical to a run without offload (greedy and seeded, float
and quantized K/V, with swap preemption sharing the tier); a tier the cost model finds slow is
recomputed instead; tenants never meet; the counters reach the cache snapshot."""

from pathlib import Path

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.errors import ConfigError
from kvserve.kvcache.layout import KVLayout
from kvserve.kvcache.prefix_index import chain_keys, root_key
from kvserve.kvstore.entry import EntryMeta, encode
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


def entry_files(root):
    return sorted(p for p in root.rglob("*.kvblock"))


def disk_llm(tiny_hf_dir, root, kv="float32", **kwargs):
    """A host tier of 12 blocks: the fillers' 33 blocks push the prefix's 10 through it to the
    disk, and a run of 10 loaded back fits in it. The tiny model prefills 40 tokens faster
    than a file opens, so its cost model would rightly recompute: here recomputing is made
    (and kept) dear, so that the disk path is what runs."""
    llm = make(tiny_hf_dir, kv, cpu_offload_memory=12 * KVLayout(
        load_checkpoint(str(tiny_hf_dir)).spec, BLOCK, kv).bytes_per_block,
        disk_offload_dir=str(root), **kwargs)
    prefill = llm.engine.block_manager.lower.prefill
    prefill.per_token_s = 1.0
    prefill.observe_many = lambda prefills, seconds: None
    return llm


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_disk_tier_gives_identical_outputs_and_survives_a_restart(tiny_hf_dir, tmp_path,
                                                                  params):
    expected, _ = turns(make(tiny_hf_dir), params)
    with disk_llm(tiny_hf_dir, tmp_path) as llm:
        got, cached = turns(llm, params)
        assert got == expected and cached == 40  # loaded from disk, through the host tier
        disk = {t.name: t for t in llm.engine.cache_snapshot().tiers}["disk"]
        assert disk.counters.num_fetched_blocks >= 8 and disk.counters.num_fetch_decisions >= 1
    assert len(entry_files(tmp_path)) >= 10
    again = disk_llm(tiny_hf_dir, tmp_path)  # a new process on the same directory
    assert {t.name: t for t in again.engine.cache_snapshot().tiers}["disk"].num_blocks >= 10
    out = again.generate(prompt(PREFIX + [3, 4, 5]), params, use_tqdm=False)[0]
    assert out.token_ids == expected and out.num_cached_tokens == 40


def test_corrupt_truncated_and_foreign_entries_are_dropped_and_recomputed(tiny_hf_dir,
                                                                          tmp_path):
    expected, _ = turns(make(tiny_hf_dir), GREEDY)
    with disk_llm(tiny_hf_dir, tmp_path) as llm:
        turns(llm, GREEDY)
        model_key = llm.engine.block_manager.model_key
    chain = chain_keys(root_key((model_key, None, None)), PREFIX, BLOCK)  # PREFIX's blocks
    files = {p.stem: p for p in entry_files(tmp_path)}
    corrupt, truncated = files[chain[6].hex()], files[chain[8].hex()]
    data = bytearray(corrupt.read_bytes())
    data[-100] ^= 0xFF  # one payload byte: the header still reads, the checksum does not
    corrupt.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-64])
    # an entry of another model under a key of this one's, in this model's directory
    foreign = corrupt.parent.parent / "ab" / ("ab" * 32 + ".kvblock")
    foreign.parent.mkdir(exist_ok=True)
    foreign.write_bytes(encode(EntryMeta(bytes.fromhex("ab" * 32), (1, 2, 3, 4), None),
                               {"k.kv": torch.zeros(2, 1, 4)}, "another model", "layout"))
    llm = disk_llm(tiny_hf_dir, tmp_path)
    assert not truncated.exists() and not foreign.exists()  # refused at the start-up scan
    out = llm.generate(prompt(PREFIX + [3, 4, 5]), GREEDY, use_tqdm=False)[0]
    assert out.token_ids == expected and out.num_cached_tokens == 24  # blocks 0-5 only
    llm.engine.runner.disk.drain()
    disk = {t.name: t for t in llm.engine.cache_snapshot().tiers}["disk"]
    assert not corrupt.exists() and disk.counters.num_rejected_entries == 1


def test_another_format_never_reads_these_entries(tiny_hf_dir, tmp_path):
    with disk_llm(tiny_hf_dir, tmp_path) as llm:
        turns(llm, GREEDY)
    float_dir = {p.parent.parent for p in entry_files(tmp_path)}
    assert len(float_dir) == 1
    other = disk_llm(tiny_hf_dir, tmp_path, kv="int8")  # its own directory
    out = other.generate(prompt(PREFIX + [3, 4, 5]), GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    # a float32 entry copied into int8's directory under its own name is refused, not read
    src = entry_files(next(iter(float_dir)))[0]
    int8_dir = next(d for d in tmp_path.iterdir() if d != next(iter(float_dir)))
    dst = int8_dir / src.parent.name / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    disk_llm(tiny_hf_dir, tmp_path, kv="int8")
    assert not dst.exists()


def redis_llm(tiny_hf_dir, url, **kwargs):
    """Host tier of 12 blocks and the shared Redis; recomputing made dear (see disk_llm)."""
    llm = make(tiny_hf_dir, cpu_offload_memory=12 * KVLayout(
        load_checkpoint(str(tiny_hf_dir)).spec, BLOCK, "float32").bytes_per_block,
        redis_url=url, **kwargs)
    prefill = llm.engine.block_manager.lower.prefill
    prefill.per_token_s = 1.0
    prefill.observe_many = lambda prefills, seconds: None
    return llm


def redis_counters(llm):
    return {t.name: t for t in llm.engine.cache_snapshot().tiers}["redis"].counters


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_two_engines_sharing_redis_reuse_each_others_prefixes_never_across_tenants(
        tiny_hf_dir, redis_server, params):
    url, _, _ = redis_server
    reference = make(tiny_hf_dir, enable_prefix_caching=False)
    expected = reference.generate(prompt(PREFIX + [3, 4, 5]), params, use_tqdm=False)[0]
    with redis_llm(tiny_hf_dir, url) as a:
        a.generate(prompt(PREFIX + [1, 2], "alice"), params, use_tqdm=False)
    assert redis_counters(a).num_stored_blocks == 12  # 50 tokens: prompt and output blocks
    b = redis_llm(tiny_hf_dir, url)  # its own pool and host tier: only Redis is shared
    other = b.generate(prompt(PREFIX + [3, 4, 5], "bob"), params, use_tqdm=False)[0]
    assert other.num_cached_tokens == 0 and redis_counters(b).num_hit_blocks == 0
    out = b.generate(prompt(PREFIX + [3, 4, 5], "alice"), params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 40 and out.token_ids == expected.token_ids
    c = redis_counters(b)
    assert c.num_hit_blocks == 10 and c.num_fetched_blocks == 10 and c.num_fetch_decisions == 2


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_damaged_redis_entry_is_deleted_and_recomputed(tiny_hf_dir, redis_server, damage):
    import redis

    url, _, _ = redis_server
    expected = make(tiny_hf_dir, enable_prefix_caching=False).generate(
        prompt(PREFIX + [3, 4, 5]), GREEDY, use_tqdm=False)[0].token_ids
    with redis_llm(tiny_hf_dir, url) as a:
        a.generate(prompt(PREFIX + [1, 2]), GREEDY, use_tqdm=False)
        chain = chain_keys(root_key((a.engine.block_manager.model_key, None, None)), PREFIX,
                           BLOCK)
        name = a.engine.runner.redis.redis_key(chain[4])
    client = redis.Redis.from_url(url)
    value = bytearray(client.get(name))
    if damage == "corrupt":
        value[-50] ^= 0xFF  # a payload byte: caught by the checksum
    else:
        value = value[:-64]  # caught by safetensors' own length checks
    client.set(name, bytes(value))
    b = redis_llm(tiny_hf_dir, url)
    out = b.generate(prompt(PREFIX + [3, 4, 5]), GREEDY, use_tqdm=False)[0]
    assert out.token_ids == expected and out.num_cached_tokens == 16  # blocks 0-3
    assert redis_counters(b).num_rejected_entries == 1
    b.engine.runner.redis.drain()  # the bad entry was deleted, and the recomputed block put
    assert client.get(name) not in (None, bytes(value))


def test_redis_going_away_degrades_to_recompute_and_it_reconnects(tiny_hf_dir, redis_server,
                                                                  caplog):
    url, start, stop = redis_server
    expected = make(tiny_hf_dir, enable_prefix_caching=False).generate(
        prompt(PREFIX + [3, 4, 5]), GREEDY, use_tqdm=False)[0].token_ids
    llm = redis_llm(tiny_hf_dir, url)
    stop()
    with caplog.at_level("WARNING", logger="kvserve.offload"):
        for _ in range(3):  # every request still answers, from recompute
            out = llm.generate(prompt(PREFIX + [3, 4, 5]), GREEDY, use_tqdm=False)[0]
            assert out.token_ids == expected
            llm.reset_prefix_cache()
            llm.engine.runner.redis.drain()
    assert sum("unreachable" in r.message for r in caplog.records) == 1  # one warning
    start()
    lower = llm.engine.block_manager.lower
    lower.redis_down_until = 0.0  # (the 2 s back-off, skipped, here and in the worker)
    llm.engine.runner.redis._down_until = 0.0
    llm.generate(prompt(PREFIX + [1, 2], "later"), GREEDY, use_tqdm=False)
    llm.engine.runner.redis.drain()
    fresh = redis_llm(tiny_hf_dir, url)
    out = fresh.generate(prompt(PREFIX + [3, 4, 5], "later"), GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 40 and out.token_ids == expected


def test_a_separate_kvserve_process_fills_redis_for_this_one(tiny_hf_dir, redis_server):
    import subprocess
    import sys

    url, _, _ = redis_server
    text = "the cache keeps the keys and values of every token it has seen so far"
    subprocess.run([sys.executable, "-m", "kvserve.cli", "generate", text, "--model",
                    str(tiny_hf_dir), "--block-size", str(BLOCK), "--max-model-len",
                    str(MAX_LEN), "--cpu-offload-memory", "1MiB", "--redis-url", url,
                    "--max-tokens", "2"], check=True, timeout=300, capture_output=True)
    llm = redis_llm(tiny_hf_dir, url)
    ids = llm.engine.tokenizer.encode(text)
    assert 8 < len(ids) < MAX_LEN - 8
    out = llm.generate(text, GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == (len(ids) - 1) // BLOCK * BLOCK > 0
    assert redis_counters(llm).num_fetched_blocks == (len(ids) - 1) // BLOCK


def test_an_entry_of_the_wrong_shape_is_refused_and_the_disk_worker_lives_on(tiny_hf_dir,
                                                                             tmp_path):
    with disk_llm(tiny_hf_dir, tmp_path) as llm:
        turns(llm, GREEDY)
        model_key = llm.engine.block_manager.model_key
        disk = llm.engine.runner.disk
    chain = chain_keys(root_key((model_key, None, None)), PREFIX, BLOCK)
    store = disk.store
    meta, parts, _ = store.read(chain[2])
    parts = {name: t[:, :, :1].contiguous() for name, t in parts.items()}  # wrong shape
    store.write(meta, parts)  # same identity, layout string and a valid checksum
    llm = disk_llm(tiny_hf_dir, tmp_path)
    out = llm.generate(prompt(PREFIX + [3, 4, 5]), GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 8  # blocks 0-1; block 2 refused, recomputed from there
    worker = llm.engine.runner.disk
    worker.drain()
    assert worker._thread.is_alive() and not Path(store.path(chain[2])).exists()
    disk_tier = {t.name: t for t in llm.engine.cache_snapshot().tiers}["disk"]
    assert disk_tier.counters.num_rejected_entries == 1


def test_a_failed_fetch_leaves_no_block_indexed_that_it_did_not_write(tiny_hf_dir,
                                                                       monkeypatch):
    tiered = make(tiny_hf_dir, cpu_offload_memory="1MiB")
    gen = tiered.generate
    gen(prompt(PREFIX + [1, 2]), GREEDY, use_tqdm=False)
    for f in FILLERS:
        gen(prompt(f), GREEDY, use_tqdm=False)
    store = tiered.engine.runner.kv_store
    real = store.write_blocks

    def broken(block_ids, parts):
        raise RuntimeError("device copy failed")

    monkeypatch.setattr(store, "write_blocks", broken)
    with pytest.raises(RuntimeError, match="device copy failed"):
        gen(prompt(PREFIX + [3, 4, 5]), GREEDY, use_tqdm=False)
    index = tiered.engine.block_manager.prefix_index
    keys = chain_keys(root_key((tiered.engine.block_manager.model_key, None, None)), PREFIX,
                      BLOCK)
    assert not any(k in index.index for k in keys)  # fetched, never written: not findable
    monkeypatch.setattr(store, "write_blocks", real)
