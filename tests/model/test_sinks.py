"""--cache-policy sinks on the tiny model: StreamingLLM as defined (every key and query at its
position inside the cache of sinks + window, re-rotated, in a plain reference backend written
here) against the engine, which keeps text positions and rotates only the sinks forward; blocks
released from the middle of the table (exact ids); generation past the model's context; and
nothing released = the full cache's tokens."""

from __future__ import annotations

import fixtures
import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.errors import ConfigError
from kvserve.kvcache.block_manager import HOLE
from kvserve.kvcache.policy import Sinks
from kvserve.model.attention import AttentionMetadata
from kvserve.model.attention.ops import attention_reference
from kvserve.model.layers import rope_shift

BS, SINK, WINDOW = 4, 4, 8
PROMPT = [(7 * j) % 200 + 10 for j in range(10)]


class StreamingReference:
    """StreamingLLM by its definition, one sequence: rotated K/V kept per position; each step's
    queries see the sink tokens and the window the policy keeps, every key and the query
    re-rotated to its index in that cache. No paging, no shortcuts."""

    retains_kv = True

    def __init__(self, inv_freq: torch.Tensor, policy: Sinks):
        self.inv_freq, self.policy = inv_freq, policy
        self.k: dict[int, list[torch.Tensor]] = {}
        self.v: dict[int, list[torch.Tensor]] = {}

    def prepare(self, meta: AttentionMetadata) -> None:
        pass

    def fused_decode(self, meta):
        return None

    def forward(self, layer_idx, q, k, v, meta):
        s = meta.seqs[0]
        ks, vs = self.k.setdefault(layer_idx, []), self.v.setdefault(layer_idx, [])
        ks.extend(k.unbind(0))
        vs.extend(v.unbind(0))
        gone = self.policy.released_blocks(s.start_position, BS)
        kept = [p for p in range(s.context_len) if p < gone.start * BS or p >= gone.stop * BS]
        cache_pos = {p: i for i, p in enumerate(kept)}
        keys = torch.stack([rope_shift(ks[p], cache_pos[p] - p, self.inv_freq) for p in kept])
        values = torch.stack([vs[p] for p in kept])
        out = []
        for r in range(s.num_new_tokens):  # each query at its cache index, causally
            p = s.start_position + r
            qr = rope_shift(q[r:r + 1], cache_pos[p] - p, self.inv_freq)
            n = cache_pos[p] + 1
            out.append(attention_reference(qr, keys[:n], values[:n]))
        return torch.cat(out)


def reference_tokens(model, policy: Sinks, steps: int) -> tuple[list[int], list[float]]:
    """The prompt in one step, then one token per step; greedy; each token's log-prob."""
    attn = StreamingReference(model.rope.inv_freq, policy)
    seq, tokens, logprobs, start = list(PROMPT), [], [], 0
    for _ in range(steps):
        n = len(seq) - start
        positions = torch.arange(start, len(seq))
        logits = model.forward(torch.tensor(seq[start:]), positions, attn,
                               AttentionMetadata.single("ref", n, start),
                               torch.tensor([n - 1]))[0]
        token = int(logits.argmax())
        logprobs.append(float(logits.log_softmax(-1)[token]))
        tokens.append(token)
        start = len(seq)
        seq.append(token)
    return tokens, logprobs


def test_sinks_equal_streaming_llm_by_its_definition_past_the_context(tiny_hf_dir):
    """300 tokens on a model of 256 positions, sinks 4 + window 8 (blocks of 4)."""
    steps = 300
    llm = LLM(model=str(tiny_hf_dir), block_size=BS, cache_policy="sinks", sink_tokens=SINK,
              window_tokens=WINDOW, max_num_batched_tokens=16)
    engine = llm.engine
    assert engine.max_model_len == 16 * 256 and engine.spec.max_position_embeddings == 256
    policy = engine.block_manager.policy
    assert isinstance(policy, Sinks) and (policy.sink_blocks, policy.window) == (1, WINDOW)
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, logprobs=0)
    out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    want_tokens, want_logprobs = reference_tokens(engine.model, policy, steps)
    assert list(out.token_ids) == want_tokens
    got = torch.tensor([lp for lp, _ in out.outputs[0].logprobs])
    torch.testing.assert_close(got, torch.tensor(want_logprobs), rtol=1e-4, atol=1e-4)
    # sinks (1 block) + the window's keys (8 tokens: 2-3 blocks) + the new token's block
    assert engine.peak_blocks_used <= 5


def test_the_middle_of_the_table_goes_back_to_the_pool(tiny_hf_dir):
    llm = LLM(model=str(tiny_hf_dir), block_size=BS, cache_policy="sinks", sink_tokens=SINK,
              window_tokens=WINDOW, enable_prefix_caching=False, max_num_batched_tokens=16)
    engine = llm.engine
    manager, pool = engine.block_manager, engine.block_manager.pool
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=40, ignore_eos=True))
    released, last = [], None
    for r, table, now in fixtures.released_per_step(engine, "a"):
        released += now
        assert all(pool.ref_counts[b] == 0 for b in now)
        last = table
        gone = manager.policy.released_blocks(r.num_computed_tokens, BS)
        assert [i for i, b in enumerate(table) if b == HOLE] == list(gone)
        # the snapshot counts the tokens whose K/V are held, not the released ones
        assert engine.cache_snapshot().num_tokens_stored == r.num_computed_tokens - len(gone) * BS
        assert table[0] != HOLE  # the sink block stays
    assert len(released) >= 8 and last[0] != HOLE


def test_without_a_release_the_tokens_are_the_full_caches(tiny_hf_dir):
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[:3]}]
    full = LLM(model=str(tiny_hf_dir), block_size=BS).generate(prompts, params, use_tqdm=False)
    sinks = LLM(model=str(tiny_hf_dir), block_size=BS, cache_policy="sinks",
                window_tokens=128, max_num_batched_tokens=64).generate(prompts, params,
                                                                      use_tqdm=False)
    assert [o.token_ids for o in sinks] == [o.token_ids for o in full]


def test_sinks_settings_are_checked(tiny_hf_dir):
    with pytest.raises(ConfigError, match="cache_policy 'sinks' releases blocks of the paged"):
        LLM(model=str(tiny_hf_dir), cache_mode="contiguous", cache_policy="sinks")
    with pytest.raises(ConfigError, match="sink_tokens and window_tokens apply to cache_policy"):
        LLM(model=str(tiny_hf_dir), window_tokens=64)
    with pytest.raises(ConfigError, match=r"keys 2064 positions apart, past the model's "
                                          r"context \(256\)"):
        LLM(model=str(tiny_hf_dir), cache_policy="sinks", block_size=4, window_tokens=8)
    with pytest.raises(ConfigError, match="kv_residual_tokens 0"):
        LLM(model=str(tiny_hf_dir), cache_policy="sinks", kv_cache_dtype="int8",
            window_tokens=64, max_num_batched_tokens=64)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_sinks_through_preemption(tiny_hf_dir, mode):
    """Three sequences past the window in a pool that holds two: swapped ones come back with
    their holes and the unconstrained run's tokens; recomputed ones are rebuilt from their
    tokens by chunked prefill (whose queries read the window as of each chunk, not token by
    token: close, not equal) and finish. The prompts release nothing while they are prefilled
    (under sinks, where a prompt's chunks end changes what its later tokens saw, and batching
    moves those ends)."""
    params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": [(11 * i + 5 * j) % 200 + 10 for j in range(n)]}
               for i, n in enumerate([9, 7, 10])]
    kw = dict(model=str(tiny_hf_dir), block_size=BS, cache_policy="sinks", sink_tokens=SINK,
              window_tokens=WINDOW, max_num_batched_tokens=8, enable_prefix_caching=False)
    free = LLM(**kw).generate(prompts, params, use_tqdm=False)
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * BS  # tiny model, float32 K/V
    tight = LLM(kv_cache_memory=bytes_per_block * 9, preemption_mode=mode, **kw)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.cache_snapshot().num_preemptions > 0
    assert all(len(o.token_ids) == 120 for o in outs)
    if mode == "swap":
        assert [o.token_ids for o in outs] == [o.token_ids for o in free]
