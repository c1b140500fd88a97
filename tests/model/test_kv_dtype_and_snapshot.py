"""On the tiny model: K/V stored in a float format other than the compute dtype (the same
rounding in the paged and the contiguous store, so both give identical tokens), and the engine's
cache snapshot and block events while requests run."""

from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.kvcache.events import BlockEventKind

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = ["The KV cache keeps the keys", "def forward(self, x):\n    return self.proj(x)"]


def tokens(llm: LLM) -> list[list[int]]:
    return [list(o.token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("kv_dtype, element_bytes", [("bfloat16", 2), ("float16", 2)])
def test_a_narrower_kv_format_is_stored_and_rounded_alike_in_every_mode(tiny_hf_dir, kv_dtype,
                                                                        element_bytes):
    runs = {}
    for mode in ("contiguous", "paged"):
        llm = LLM(model=str(tiny_hf_dir), cache_mode=mode, kv_cache_dtype=kv_dtype,
                  block_size=4, kv_cache_memory="1MiB")
        snap = llm.engine.cache_snapshot()
        spec = llm.engine.spec
        assert snap.kv_cache_dtype == kv_dtype
        assert snap.bytes_per_token == 2 * spec.num_layers * spec.num_kv_heads * \
            spec.head_dim * element_bytes
        runs[mode] = tokens(llm)
    assert runs["paged"] == runs["contiguous"]
    full = tokens(LLM(model=str(tiny_hf_dir), cache_mode="paged", block_size=4))
    # rounding K/V may move a near-tie; the first tokens of each prompt agree
    assert [r[:4] for r in runs["paged"]] == [r[:4] for r in full]


def test_snapshot_and_events_follow_a_running_request(tiny_hf_dir):
    llm = LLM(model=str(tiny_hf_dir), block_size=4, kv_cache_memory="1MiB")
    engine = llm.engine
    engine.record_kv_events()
    ids = llm.tokenizer.encode(PROMPTS[1])
    engine.add_request("r", ids, GREEDY, cache_salt="tenant-x")
    engine.step()  # the whole prompt
    snap = engine.cache_snapshot(with_requests=True)
    blocks = snap.blocks_of("r")
    assert len(blocks) == -(-len(ids) // 4) and snap.pool.num_used_blocks == len(blocks)
    assert snap.requests[0].num_tokens == len(ids) == snap.num_tokens_stored
    assert snap.prefix.num_cached_blocks == len(ids) // 4 == snap.events.num_stored
    stored = engine.drain_kv_events()
    assert [e.block_id for e in stored] == list(blocks[:len(ids) // 4])
    assert {e.kind for e in stored} == {BlockEventKind.STORED}
    tenant = engine.block_manager.events.tenant_hash("tenant-x")
    assert {e.tenant for e in stored} == {tenant} and "tenant-x" not in repr(stored)
    while engine.has_unfinished_requests():
        engine.step()
    engine.pop_finished("r")
    after = engine.cache_snapshot(with_requests=True)
    assert after.pool.num_used_blocks == 0 and after.requests == ()
    freed = [e for e in engine.drain_kv_events() if e.kind is BlockEventKind.FREED]
    assert after.events.num_freed == len(freed) and {e.block_id for e in freed} >= set(blocks)
    keyed = {e.block_id: e.block_key for e in freed if e.block_key is not None}
    assert [keyed[e.block_id] for e in stored] == [e.block_key for e in stored]
