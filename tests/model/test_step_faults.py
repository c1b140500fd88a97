"""A step that raises for one request ends that request alone, with its own error; the others in
the same step get exactly the tokens they get without the fault."""

from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.errors import EngineStepError
from kvserve.runner.model_runner import ModelRunner

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = {"good-1": [11, 12, 13, 14, 15], "bad": [21, 22, 23], "good-2": [31, 32, 33, 34]}


@pytest.fixture()
def faulty(monkeypatch):
    """The runner raises whenever the request whose prompt is PROMPTS["bad"] is in the step."""
    real = ModelRunner.execute
    calls = []

    def execute(self, plan, requests):
        ids = [s.request_id for s in plan.seqs]
        calls.append(ids)
        if any(requests[i].prompt_token_ids == PROMPTS["bad"] for i in ids):
            raise RuntimeError("the sampler broke on bad's row")
        return real(self, plan, requests)

    monkeypatch.setattr(ModelRunner, "execute", execute)
    return calls


def run(engine) -> dict[str, tuple[list[int], str | None]]:
    for rid, ids in PROMPTS.items():
        engine.add_request(rid, ids, GREEDY)
    out: dict[str, tuple[list[int], str | None]] = {rid: ([], None) for rid in PROMPTS}
    while engine.has_unfinished_requests():
        for d in engine.step():
            tokens, _ = out[d.request_id]
            out[d.request_id] = (tokens + list(d.new_token_ids), d.error)
    for rid in PROMPTS:
        engine.pop_finished(rid)
    return out


def test_only_the_failing_request_fails(tiny_hf_dir, faulty):
    good = [rid for rid in PROMPTS if rid != "bad"]
    expected = {rid: list(o.token_ids) for rid, o in zip(good, LLM(
        model=str(tiny_hf_dir), block_size=4).generate(
        [{"prompt_token_ids": PROMPTS[rid]} for rid in good], GREEDY, use_tqdm=False))}
    faulty.clear()
    llm = LLM(model=str(tiny_hf_dir), block_size=4)
    out = run(llm.engine)
    assert out["bad"] == ([], "engine error: RuntimeError: the sampler broke on bad's row")
    for rid in ("good-1", "good-2"):
        assert out[rid] == (expected[rid], None)
    assert faulty[0] == list(PROMPTS)  # one batched step failed, then one sequence at a time
    assert sorted(map(tuple, faulty[1:4])) == [("bad",), ("good-1",), ("good-2",)]
    assert llm.engine.cache_snapshot().pool.num_used_blocks == 0
    llm.engine.block_manager.check_invariants()


def test_offline_generate_names_the_failed_request(tiny_hf_dir, faulty):
    llm = LLM(model=str(tiny_hf_dir), block_size=4)
    prompts = [{"prompt_token_ids": ids} for ids in PROMPTS.values()]
    with pytest.raises(EngineStepError, match="request 1-0: engine error: RuntimeError"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and not llm.engine.requests
