"""Waiting requests: FCFS inside a tenant (preempted ones first), the tenant with the fewest running
requests next, round robin among equals, removal by id; a tenant over its share of the running
slots gives one back; requests compare by identity (no field-by-field equality in any queue)."""

from kvserve.config import SchedulerConfig
from kvserve.kvcache.block_manager import BlockManager
from kvserve.kvcache.block_pool import BlockPool
from kvserve.request import Request, SamplingParams
from kvserve.scheduler.plan import SampledToken, StepResult
from kvserve.scheduler.queues import WaitingQueue
from kvserve.scheduler.scheduler import Scheduler


def req(rid: str, tenant: str | None = None, **params) -> Request:
    return Request(rid, [5, 6, 7], SamplingParams(max_tokens=params.pop("max_tokens", 1),
                                                  **params), tenant=tenant)


def drain(q: WaitingQueue) -> list[str]:
    out = []
    while (r := q.peek()) is not None:
        q.pop(r)
        out.append(r.request_id)
    return out


def test_tenants_take_turns_and_each_is_fcfs():
    q = WaitingQueue()
    for i in range(6):
        q.add(req(f"a{i}", "A"))  # a burst from A first
    for i in range(2):
        q.add(req(f"b{i}", "B"))
    q.add(req("c0", "C"))
    assert len(q) == 9 and q.counts_by_tenant() == {"A": 6, "B": 2, "C": 1}
    assert drain(q) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4", "a5"]
    assert not q and len(q) == 0


def test_without_tenants_it_is_plain_fcfs():
    q = WaitingQueue()
    for rid in "abcd":
        q.add(req(rid))
    assert drain(q) == list("abcd")


def test_preempted_requests_go_first_in_their_tenant_oldest_first():
    q = WaitingQueue()
    q.add(req("new", "A"))
    q.push_front(req("victim2", "B"))  # the newest running is preempted first
    q.push_front(req("victim1", "A"))
    assert q.counts_by_tenant() == {"A": 2, "B": 1}
    assert drain(q) == ["victim1", "victim2", "new"]  # A, B, A in turn
    q.add(req("a1", "A"))
    q.push_front(req("a0", "A"))
    assert drain(q) == ["a0", "a1"]


def test_the_tenant_with_fewest_running_goes_next():
    q = WaitingQueue()
    for rid, tenant in (("a0", "A"), ("a1", "A"), ("b0", "B")):
        q.add(req(rid, tenant))
    assert q.peek({"A": 3, "B": 1}).request_id == "b0"
    assert q.peek({"A": 1, "B": 1}).request_id == "a0"  # equals: whoever is first in turn


def test_remove_by_id_anywhere():
    q = WaitingQueue()
    for i in range(3):
        q.add(req(f"a{i}", "A"))
    q.add(req("b0", "B"))
    q.push_front(req("r", "A"))
    assert q.remove("a1") and q.remove("r") and q.remove("b0") and not q.remove("b0")
    assert "a1" not in q and "a0" in q
    assert drain(q) == ["a0", "a2"] and q.counts_by_tenant() == {}


def test_requests_compare_by_identity():
    a, b = req("x"), req("x")
    assert a != b and a == a and len({a, b}) == 2


def test_scheduler_admits_tenants_in_turn():
    s = Scheduler(SchedulerConfig(max_num_seqs=2), 32, True, (2,))
    for i in range(4):
        s.add(req(f"a{i}", "A"))
    s.add(req("b0", "B"))
    admitted = []
    while s.has_unfinished():
        plan = s.schedule()
        admitted += [q.request_id for q in plan.seqs]
        s.update(plan, StepResult(tuple(SampledToken(q.request_id, 9) for q in plan.seqs)))
    assert admitted == ["a0", "b0", "a1", "a2", "a3"]  # b0 does not wait behind A's burst


def test_aborting_thousands_of_waiting_requests_touches_only_them():
    s = Scheduler(SchedulerConfig(max_num_seqs=2), 32, True, (2,))
    rs = [req(f"r{i}", f"t{i % 3}") for i in range(20_000)]
    for r in rs:
        s.add(r)
    from kvserve.request import FinishReason

    for r in rs[::2]:
        s.finish(r, FinishReason.ABORT)
    assert len(s.waiting) == 10_000 and all(r.status.finished for r in rs[::2])
    assert s.waiting.peek() is rs[3]  # tenant t0 keeps its turn; r0 was aborted, r3 is next


def test_a_tenant_with_nothing_running_gets_a_slot_back_at_once():
    """B fills all four slots; A arrives: one of B's is preempted (the newest) and A admitted in
    the same step; A's second request then waits for the next free slot, which it gets before
    any of B's waiting requests."""
    blocks = BlockManager(BlockPool(64), 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=4), 64, True, (2,), blocks)
    for i in range(6):
        s.add(req(f"b{i}", "B", max_tokens=20, ignore_eos=True))

    def step() -> list[str]:
        plan = s.schedule()
        s.update(plan, StepResult(tuple(SampledToken(q.request_id, 9) for q in plan.seqs)))
        return [q.request_id for q in plan.seqs]

    assert step() == ["b0", "b1", "b2", "b3"]
    s.add(req("a0", "A", max_tokens=20, ignore_eos=True))
    s.add(req("a1", "A", max_tokens=20, ignore_eos=True))
    assert step() == ["b0", "b1", "b2", "a0"]  # b3 preempted, a0 admitted at once
    assert step() == ["b0", "b1", "b2", "a0"]  # A runs one: nobody else is preempted
    assert s.num_fair_share_preemptions == 1 and s.num_preemptions == 1
    assert s.waiting.counts_by_tenant() == {"A": 1, "B": 3}
    assert [r.request_id for r in s.waiting if r.tenant == "B"] == ["b3", "b4", "b5"]
    admitted = []
    for _ in range(18):  # b0..b2 finish (20 tokens each): slots free up
        admitted += [x for x in step() if x not in admitted]
    # three slots free: B (nothing running) first, then the tenants in turn, fewest first
    assert admitted[-3:] == ["b3", "a1", "b4"] and "b5" not in admitted
    blocks.check_invariants()
