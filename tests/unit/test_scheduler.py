"""The scheduler without a model: token plans, admission order and token-level stops."""

from kvserve.config import SchedulerConfig
from kvserve.request import FinishReason, Request, RequestStatus, SamplingParams
from kvserve.scheduler.plan import SampledToken, StepResult
from kvserve.scheduler.scheduler import Scheduler

EOS = 2


def make(retains_kv=True, max_num_seqs=4, max_model_len=32):
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs), max_model_len, retains_kv, (EOS,))


def req(rid, prompt=(5, 6, 7), **params):
    return Request(rid, list(prompt), SamplingParams(**params))


def step(s, token):
    plan = s.schedule()
    return plan, s.update(plan, StepResult(tuple(SampledToken(q.request_id, token)
                                                 for q in plan.seqs)))


def test_cached_requests_feed_only_new_tokens():
    s = make()
    s.add(req("a", max_tokens=5))
    plan, _ = step(s, 9)
    assert plan.seqs[0].token_ids == (5, 6, 7) and plan.seqs[0].start_position == 0
    plan, _ = step(s, 10)
    assert plan.seqs[0].token_ids == (9,) and plan.seqs[0].start_position == 3
    assert s.running[0].num_computed_tokens == 4


def test_no_cache_refeeds_the_whole_sequence_every_step():
    s = make(retains_kv=False)
    s.add(req("a", max_tokens=5))
    step(s, 9)
    plan, _ = step(s, 10)
    assert plan.seqs[0].token_ids == (5, 6, 7, 9) and plan.seqs[0].start_position == 0
    assert s.running[0].num_computed_tokens == 0


def test_admission_is_fcfs_up_to_max_num_seqs():
    s = make(max_num_seqs=2)
    for rid in "abc":
        s.add(req(rid, max_tokens=1))
    plan, finished = step(s, 9)
    assert [q.request_id for q in plan.seqs] == ["a", "b"]
    assert [r.request_id for r in finished] == ["a", "b"]
    plan, _ = step(s, 9)
    assert [q.request_id for q in plan.seqs] == ["c"]
    assert not s.has_unfinished()


def test_eos_stops_unless_ignored_or_below_min_tokens():
    s = make()
    a, b, c = req("a"), req("b", ignore_eos=True), req("c", min_tokens=2)
    for r in (a, b, c):
        s.add(r)
    _, finished = step(s, EOS)
    assert finished == [a]
    assert a.finish_reason is FinishReason.STOP and a.status is RequestStatus.FINISHED_STOPPED
    _, finished = step(s, EOS)
    assert finished == [c]


def test_stop_token_ids_record_the_stop_reason():
    s = make()
    r = req("a", stop_token_ids=[9])
    s.add(r)
    step(s, 9)
    assert r.finish_reason is FinishReason.STOP and r.stop_reason == 9


def test_max_tokens_and_context_length_finish_with_length():
    s = make(max_model_len=6)
    a, b = req("a", max_tokens=2), req("b", max_tokens=100)
    s.add(a)
    s.add(b)
    step(s, 9)
    _, finished = step(s, 9)
    assert finished == [a]
    _, finished = step(s, 9)
    assert finished == [b] and b.num_tokens == 6
    assert a.finish_reason is b.finish_reason is FinishReason.LENGTH


def test_finish_removes_a_waiting_request():
    s = make(max_num_seqs=1)
    a, b = req("a"), req("b")
    s.add(a)
    s.add(b)
    s.schedule()
    s.finish(b, FinishReason.ABORT)
    assert b.status is RequestStatus.FINISHED_ABORTED and s.find("b") is None


def test_token_ids_between_spans_prompt_and_output():
    r = req("a", prompt=(1, 2, 3))
    r.output_token_ids += [4, 5]
    for start in range(6):
        for end in range(start, 6):
            assert r.token_ids_between(start, end) == r.all_token_ids[start:end]
