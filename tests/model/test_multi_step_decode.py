"""Multi-step decode (num_scheduler_steps) on the tiny model: several greedy decode steps in one
plan, run in one C call (kernels/cpu.py decode_steps) or, as the reference, one execute() per
step, give what one step per plan gives: the same tokens, texts, stops and K/V."""

import pytest
import torch
from test_engine_tiny import PROMPTS, TEXT_PROMPT

from kvserve import LLM, SamplingParams
from kvserve.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="C kernels not built")


def make(model, steps: int, fused: bool = True, **kw) -> LLM:
    llm = LLM(model=str(model), cache_mode="paged", enable_prefix_caching=False,
              num_scheduler_steps=steps, **kw)
    llm.engine.runner.fused_steps = fused
    return llm


def count_plans(llm: LLM, monkeypatch) -> list[int]:
    """Record each multi-step plan's step count as it runs."""
    runner, seen = llm.engine.runner, []
    real = runner.execute_steps
    monkeypatch.setattr(runner, "execute_steps",
                        lambda plan, requests: (seen.append(plan.num_steps),
                                                real(plan, requests))[1])
    return seen


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_multi_step_equals_one_step_per_plan(tiny_hf_dir, kv_dtype, monkeypatch):
    """Tokens, and K/V bit for bit: every request runs to its max_tokens (the lookahead is
    capped by it, so no slot is written that single steps leave alone)."""
    calls = []
    real = cpu_kernels.decode_steps
    monkeypatch.setattr(cpu_kernels, "decode_steps",
                        lambda *a: (calls.append(a[3]), real(*a))[1])
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in (30, 17, 45)]  # requests leave the batch at different steps
    runs = {}
    for steps, fused in ((1, True), (8, True), (8, False)):
        llm = make(tiny_hf_dir, steps, fused, kv_cache_dtype=kv_dtype)
        plans = count_plans(llm, monkeypatch)
        outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
        keys, values = llm.engine.runner.attention.store.float_kv()
        runs[steps, fused] = ([list(o.outputs[0].token_ids) for o in outs], keys.clone(),
                              values.clone())
        if steps == 1:
            assert not plans and not calls
        else:  # the plans ran several steps each, fused in one call or not at all
            assert plans and max(plans) == 8 and sum(plans) > 40
            assert (calls == plans) if fused else not calls
        calls.clear()
    for other in ((8, True), (8, False)):
        assert runs[other][0] == runs[1, True][0]
        assert torch.equal(runs[other][1], runs[1, True][1])
        assert torch.equal(runs[other][2], runs[1, True][2])


def test_stops_inside_a_plan_end_the_request_where_one_step_would(tiny_hf_dir, monkeypatch):
    single, multi = make(tiny_hf_dir, 1), make(tiny_hf_dir, 8)
    base = dict(max_tokens=40, temperature=0.0)
    full = single.generate(TEXT_PROMPT, SamplingParams(ignore_eos=True, **base),
                           use_tqdm=False)[0]
    tokens, text = list(full.token_ids), full.text
    stop = next(text[i:i + 3] for i in range(6, len(text) - 3)
                if text[i:i + 3].isascii() and text[i:i + 3].isprintable()
                and text.find(text[i:i + 3]) == i)
    params = [
        SamplingParams(stop=[stop], ignore_eos=True, **base),  # a stop string
        SamplingParams(stop=[stop], include_stop_str_in_output=True, ignore_eos=True, **base),
        SamplingParams(stop_token_ids=[tokens[11]], ignore_eos=True, **base),  # a stop token
        SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True),  # length
        SamplingParams(**base),  # EOS may end it
    ]
    plans = count_plans(multi, monkeypatch)
    want = single.generate([TEXT_PROMPT] * len(params), params, use_tqdm=False)
    got = multi.generate([TEXT_PROMPT] * len(params), params, use_tqdm=False)
    assert plans and max(plans) > 1
    for w, g in zip(want, got):
        w, g = w.outputs[0], g.outputs[0]
        assert (g.text, g.token_ids, g.finish_reason, g.stop_reason) == \
            (w.text, w.token_ids, w.finish_reason, w.stop_reason)
    assert got[0].outputs[0].finish_reason == "stop" and len(got[0].outputs[0].token_ids) < 40
    # the engine freed every block, the lookahead's too
    pool = multi.engine.block_manager.pool
    assert pool.num_used_blocks == 0


def test_streamed_deltas_carry_a_plan_s_tokens_once(tiny_hf_dir, monkeypatch):
    llm = make(tiny_hf_dir, 8)
    plans = count_plans(llm, monkeypatch)
    engine = llm.engine
    params = SamplingParams(max_tokens=33, temperature=0.0, ignore_eos=True)
    engine.add_request("s", llm.tokenizer.encode(TEXT_PROMPT), params)
    deltas = []
    while engine.has_unfinished_requests():
        step = engine.step()
        assert len({d.request_id for d in step}) == len(step)  # one delta per request a step
        deltas += step
    out = engine.pop_finished("s")
    assert [t for d in deltas for t in d.new_token_ids] == out.output_token_ids
    assert "".join(d.new_text for d in deltas) == out.output_text
    assert max(len(d.new_token_ids) for d in deltas) > 1 and plans
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]


def test_requests_that_read_their_logits_take_single_steps(tiny_hf_dir, monkeypatch):
    llm = make(tiny_hf_dir, 8)
    plans = count_plans(llm, monkeypatch)
    for p in (SamplingParams(max_tokens=20, temperature=0.8, seed=1),
              SamplingParams(max_tokens=20, temperature=0.0, logprobs=2),
              SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.3)):
        llm.generate(PROMPTS[1], p, use_tqdm=False)
    assert not plans


def test_no_lookahead_where_the_runner_cannot_fuse_the_steps(tiny_hf_dir):
    for kw in (dict(cache_mode="contiguous"), dict(kv_cache_dtype="fp8_e4m3")):
        llm = LLM(model=str(tiny_hf_dir), num_scheduler_steps=8, **kw)
        assert llm.engine.scheduler.max_steps == 1


def test_a_failing_multi_step_plan_reruns_as_one_step(tiny_hf_dir, monkeypatch):
    single, multi = make(tiny_hf_dir, 1), make(tiny_hf_dir, 8)
    params = SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True)
    failures = []

    def boom(plan, requests):
        failures.append(plan.num_steps)
        raise RuntimeError("injected")

    monkeypatch.setattr(multi.engine.runner, "execute_steps", boom)
    got = multi.generate(PROMPTS[1], params, use_tqdm=False)[0]
    want = single.generate(PROMPTS[1], params, use_tqdm=False)[0]
    assert failures and got.outputs[0].token_ids == want.outputs[0].token_ids
    # tried once: one step per plan from then on
    assert len(failures) == 1 and multi.engine.scheduler.max_steps == 1
