"""Multi-step scheduling without a model: when the scheduler plans several greedy decode steps in
one plan (num_scheduler_steps), how many, and the slots it takes for them."""

import pytest

from kvserve.config import SchedulerConfig
from kvserve.errors import ConfigError
from kvserve.kvcache.block_manager import BlockManager
from kvserve.kvcache.block_pool import BlockPool
from kvserve.kvcache.prefix_index import PrefixIndex
from kvserve.request import Request, SamplingParams
from kvserve.scheduler.plan import SampledToken, StepResult
from kvserve.scheduler.scheduler import MULTI_STEP_MAX_S, Scheduler

BS = 4
EOS = 0


def make(num_blocks=32, steps=8, max_model_len=64, max_num_seqs=4, pace=0.001, index=None):
    manager = BlockManager(BlockPool(num_blocks), BS, prefix_index=index)
    s = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, num_scheduler_steps=steps),
                  max_model_len, True, (EOS,), manager)
    if pace is not None:
        s.observe_decode_step(pace)
    return s


def req(rid, prompt=(5, 6, 7), max_tokens=40, **params):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                     **params))


def prefill(s, *requests):
    for r in requests:
        s.add(r)
    plan = s.schedule()
    assert plan.num_steps == 1  # a prefill is one step
    s.update(plan, StepResult(tuple(SampledToken(q.request_id, 9) for q in plan.seqs)))


def test_greedy_decodes_get_several_steps_with_slots_for_them():
    s = make()
    a, b = req("a"), req("b", prompt=(1, 2, 3, 4, 5))
    prefill(s, a, b)
    plan = s.schedule()
    assert plan.num_steps == 8
    for q, r in zip(plan.seqs, (a, b)):
        # the step feeds position num_computed; 8 steps reach num_computed + 7
        assert len(q.block_ids) * BS >= r.num_computed_tokens + 8
        assert list(q.block_ids) == s.blocks.block_ids(r.request_id)
    # step i of the plan: position + i, the token step i - 1 picked
    sub = plan.decode_step(3, {"a": 11, "b": 12}, running={"b"})
    assert [(q.request_id, q.token_ids, q.start_position) for q in sub.seqs] == \
        [("b", (12,), plan.seqs[1].start_position + 3)]
    assert plan.decode_step(0, {}).seqs == plan.seqs


def test_capped_by_max_tokens_and_context_length():
    s = make()
    prefill(s, req("a", max_tokens=4))  # one token out, 3 to go
    assert s.schedule().num_steps == 3
    s = make(max_model_len=8)
    prefill(s, req("a", prompt=(1, 2, 3, 4, 5)))  # 6 tokens of 8
    assert s.schedule().num_steps == 2


@pytest.mark.parametrize("params", [
    dict(temperature=0.7), dict(logprobs=2), dict(repetition_penalty=1.2),
    dict(frequency_penalty=0.5), dict(presence_penalty=0.5), dict(min_tokens=5)])
def test_one_step_when_a_request_needs_its_logits(params):
    s = make()
    plain = req("a")
    other = Request("b", [5, 6, 7], SamplingParams(max_tokens=40, **{
        "temperature": 0.0, **params}))
    prefill(s, plain, other)
    assert s.schedule().num_steps == 1


def test_one_step_while_a_request_waits_or_before_the_pace_is_known():
    s = make(max_num_seqs=1)
    prefill(s, req("a"))
    s.add(req("b"))  # no slot for it: it waits, and would wait 8 steps
    assert s.schedule().num_steps == 1
    s = make(pace=None)
    prefill(s, req("a"))
    assert s.schedule().num_steps == 1  # the first decode step is timed alone
    s.observe_decode_step(0.002)
    assert s.schedule().num_steps == 8


def test_capped_by_the_time_it_takes():
    s = make(pace=MULTI_STEP_MAX_S / 3)  # three steps fill the time
    prefill(s, req("a"))
    assert s.schedule().num_steps == 3
    s = make(pace=MULTI_STEP_MAX_S)  # a batch whose step takes that long: one at a time
    prefill(s, req("a"))
    assert s.schedule().num_steps == 1


def test_lookahead_never_preempts_and_fits_the_slots_held():
    # 3 blocks: "a" holds 2 (prompt of 5 + 1 out = 6 tokens), 1 left for b's prompt
    s = make(num_blocks=3)
    a, b = req("a", prompt=(1, 2, 3, 4, 5)), req("b", prompt=(1, 2))
    prefill(s, a, b)
    assert s.blocks.pool.num_free_blocks == 0
    plan = s.schedule()
    # a: 8 slots held, computes from position 5; b: 4 held, from 2 -> 2 steps fit both
    assert plan.num_steps == 2
    assert not s.waiting and len(s.running) == 2 and s.num_preemptions == 0


def test_num_scheduler_steps_one_turns_it_off_and_is_checked():
    s = make(steps=1)
    prefill(s, req("a"))
    assert s.schedule().num_steps == 1
    with pytest.raises(ConfigError, match="num_scheduler_steps"):
        SchedulerConfig(num_scheduler_steps=0)


def step_all(s, plan, token=9):
    """Apply a plan's steps as the engine does, every request picking `token`."""
    for i in range(plan.num_steps):
        running = {r.request_id for r in s.running}
        sub = plan.decode_step(i, {q.request_id: token for q in plan.seqs}, running) \
            if plan.num_steps > 1 else plan
        if not sub.seqs:
            break
        s.update(sub, StepResult(tuple(SampledToken(q.request_id, token) for q in sub.seqs
                                       if q.sample)))


def test_lookahead_never_evicts_a_cached_prefix():
    """The lookahead takes only free blocks that hold no cached prefix: a request that stops
    early must not have cost the cache a block single steps would have kept."""
    s = make(num_blocks=4, index=PrefixIndex())
    cached = req("c", prompt=(1, 2, 3, 4, 5), max_tokens=1)  # fills one block, then ends
    prefill(s, cached)
    assert s.blocks.prefix_index.index and not s.running
    # the cached block sits free in the queue, behind the never-used ones
    a = req("a", prompt=(7, 8, 9), max_tokens=40)
    prefill(s, a)
    uncached = s.blocks.uncached_free_blocks(10)
    assert uncached == s.blocks.pool.num_free_blocks - 1 < 10
    held = len(s.blocks.block_ids("a"))
    plan = s.schedule()
    # it could take the uncached blocks, no more: 4 slots each, and a's own spare slot
    assert plan.num_steps == min(8, (held + uncached) * BS - a.num_computed_tokens)
    assert len(s.blocks.prefix_index.index) == 1  # nothing evicted


def test_the_count_is_what_every_request_can_get_and_nothing_more_is_taken():
    s = make(num_blocks=5)
    a, b = req("a", prompt=(1, 2, 3)), req("b", prompt=(1, 2, 3, 4, 5, 6, 7))
    prefill(s, a, b)  # a: 1 block, b: 2, 2 free
    plan = s.schedule()
    # 8 steps would need 2 more blocks each; 5 need one each (a: positions 3-7, b: 7-11)
    assert plan.num_steps == 5
    assert [len(q.block_ids) for q in plan.seqs] == [2, 3]
    assert s.blocks.pool.num_free_blocks == 0
    s = make(num_blocks=3)
    prefill(s, req("a", prompt=(1, 2, 3)), req("b", prompt=(1, 2, 3, 4, 5, 6, 7)))
    plan = s.schedule()  # no free block: each runs in the slots it holds, a 1 more, b none
    assert plan.num_steps == 1 and [len(q.block_ids) for q in plan.seqs] == [1, 2]


def test_no_lookahead_for_a_request_admitted_by_this_plan_or_past_the_fused_batch():
    s = make()
    prefill(s, req("a"))
    s.add(req("b", prompt=(5,)))  # a one-token prompt: a one-token "decode" on admission
    plan = s.schedule()
    assert [q.request_id for q in plan.seqs] == ["a", "b"] and plan.num_steps == 1
    step_all(s, plan)
    assert s.schedule().num_steps == 8  # b has its first token: both may now run ahead
    s = make()
    s.max_steps_batch = 1  # the runner fuses one sequence at most
    prefill(s, req("a"), req("b"))
    assert s.schedule().num_steps == 1
