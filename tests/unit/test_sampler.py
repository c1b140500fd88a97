"""Sampler: exact answers on tiny vocabularies; the batched path against the per-row reference."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.overrides import TorchFunctionMode

from kvserve.request import SamplingParams
from kvserve.runner.sampler import (
    Sampler,
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    argmax_rows,
    reference_penalize_row,
    reference_sample_row,
)

VOCAB = 16
EOS = 15


def make_batch(params, prompts=None, outputs=None, generators=None, eos=(EOS,)):
    n = len(params)
    return SamplingBatch.build(params, prompts or [[0]] * n, outputs or [[]] * n,
                               generators or [None] * n, "cpu", eos_token_ids=eos)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(logits, params, **kw) -> list[int]:
    return Sampler()(logits, make_batch(params, **kw)).token_ids.tolist()


def random_logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=gen(seed)) * 2


class CallRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


# ---- greedy ----

def test_greedy_is_argmax_and_fast_path_only_calls_argmax():
    logits = random_logits(5)
    batch = make_batch([SamplingParams(temperature=0.0)] * 5)
    before = logits.clone()
    with CallRecorder() as rec:
        out = Sampler()(logits, batch)
    # numpy's argmax over the logits (reading .device and .dtype): no copy, no softmax
    assert set(rec.names) <= {"argmax", "numpy", "__get__"}, rec.names
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.token_ids.dtype == torch.long and out.logprobs is None
    assert torch.equal(logits, before)


def test_argmax_rows_equals_torch_argmax_with_ties_nan_and_infinities():
    """The numpy argmax of float32 CPU rows is torch's: the first largest, NaN the largest."""
    nan, inf = math.nan, math.inf
    logits = torch.tensor([[1.0, nan, 3.0, nan], [2.0, 5.0, 5.0, 1.0], [-inf] * 4,
                           [inf, 1.0, inf, 0.0], [0.0, 0.0, 0.0, 0.0]])
    wide = random_logits(7, vocab=49152).round()  # many ties
    for x in (logits, wide, wide.t(), wide[:, ::3], torch.zeros(0, 5)):
        got = argmax_rows(x)
        assert got.dtype == torch.long and got.tolist() == x.argmax(dim=-1).tolist()
    assert argmax_rows(logits.bfloat16()).tolist() == logits.bfloat16().argmax(-1).tolist()


def test_plain_greedy_batches_skip_the_columns_and_equal_the_full_build(monkeypatch):
    """All rows greedy with no penalty, logprobs or pending min_tokens: build() returns the same
    batch without building its per-row columns."""
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_tokens=2)] * 3
    outputs = [[1, 2], [3, 4, 5], [6, 7]]  # every row past min_tokens
    fast = make_batch(params, outputs=outputs)
    monkeypatch.setattr(SamplingParams, "plain", lambda *a: False)
    full = make_batch(params, outputs=outputs)
    for name in SamplingBatch.__dataclass_fields__:
        a, b = getattr(fast, name), getattr(full, name)
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), name
    monkeypatch.undo()
    short = make_batch(params, outputs=[[1], [3, 4, 5], [6, 7]])  # row 0 short of min_tokens
    assert short.min_tokens_banned is not None
    for changed in (SamplingParams(temperature=0.0, logprobs=2),
                    SamplingParams(temperature=0.0, presence_penalty=0.5),
                    SamplingParams(temperature=0.0, repetition_penalty=1.1)):
        batch = make_batch([params[0], changed], outputs=outputs[:2])
        assert batch.max_num_logprobs is not None or batch.changes_logits


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_any_float_dtype(dtype):
    logits = random_logits(4).to(dtype)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5), SamplingParams(top_k=1)] * 2
    expected = [reference_sample_row(logits[i], p, [0], [], None) for i, p in enumerate(params)]
    assert sample(logits, params) == expected


@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 5.0, 100.0])
def test_top_k_1_equals_greedy(temperature):
    logits = random_logits(8, seed=1)
    params = [SamplingParams(temperature=temperature, top_k=1)] * 8
    assert sample(logits, params) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_tiny_top_p_equals_greedy(temperature):
    logits = random_logits(8, seed=2)
    params = [SamplingParams(temperature=temperature, top_p=1e-6)] * 8
    gens = [gen(i) for i in range(8)]
    assert sample(logits, params, generators=gens) == logits.argmax(-1).tolist()


def test_mixed_greedy_and_random_rows():
    logits = random_logits(6, seed=3)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)] * 3
    assert sample(logits, params) == logits.argmax(-1).tolist()


# ---- the masks, exactly ----

def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row > -math.inf).flatten().tolist() for row in logits]


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0], [1.0, 2.0, 2.0, 0.0, 2.0]])
    apply_top_k_top_p(logits, torch.tensor([2, 1]), None)
    assert kept(logits) == [[1, 3], [1, 2, 4]]  # ties with the k-th largest stay, as in vLLM
    assert logits[0, 1].item() == 3.0 and logits[0, 3].item() == 2.0  # values untouched


def test_top_k_zero_or_above_vocab_is_off():
    logits = random_logits(2, vocab=5)
    masked = logits.clone()
    apply_top_k_top_p(masked, torch.tensor([0, 99]), None)
    assert torch.equal(masked, logits)


def test_top_p_keeps_fewest_tokens_reaching_the_mass():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().repeat(4, 1)
    apply_top_k_top_p(logits, None, torch.tensor([0.4, 0.7, 0.85, 1.0]))
    assert kept(logits) == [[1], [1, 3], [1, 2, 3], [0, 1, 2, 3]]


def test_top_p_stops_once_the_mass_is_reached_exactly():
    logits = torch.zeros(2, 4)  # probs exactly 0.25 each; ties keep vocabulary order
    apply_top_k_top_p(logits, None, torch.tensor([0.5, 0.5001]))
    assert kept(logits) == [[0, 1], [0, 1, 2]]


def test_top_p_renormalizes_after_top_k():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().unsqueeze(0)
    # after top_k=2 the mass is 4/7, 3/7: top_p=0.5 keeps only the first
    apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([0.5]))
    assert kept(logits) == [[0]]


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    logits = probs.log().repeat(3, 1)
    apply_min_p(logits, torch.tensor([0.0, 0.5, 0.6]))
    assert kept(logits) == [[0, 1, 2, 3, 4], [0, 1, 2], [0, 1]]


def test_min_p_sampling_stays_in_allowed_set():
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    logits = probs.log().repeat(2000, 1)
    torch.manual_seed(0)
    tokens = sample(logits, [SamplingParams(min_p=0.5)] * 2000)
    assert set(tokens) == {0, 1, 2}


# ---- distributions and seeds ----

@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature):
    vocab, draws = 6, 40_000
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    torch.manual_seed(1234)
    tokens = torch.tensor(sample(logits.repeat(draws, 1),
                                 [SamplingParams(temperature=temperature)] * draws))
    observed = torch.bincount(tokens, minlength=vocab).double()
    expected = torch.softmax(logits.double() / temperature, -1) * draws
    chi_square = ((observed - expected) ** 2 / expected).sum().item()
    assert chi_square < 30  # 5 dof: p < 2e-5 to fail by chance


def test_batched_equals_reference_over_many_draws():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -3.0, 0.2, 0.1])
    params = SamplingParams(temperature=0.8)
    batched_gen, reference_gen = gen(7), gen(7)
    batched, reference = [], []
    for _ in range(300):
        batched += sample(logits[None], [params], generators=[batched_gen])
        reference.append(reference_sample_row(logits, params, [0], [], reference_gen))
    assert batched == reference
    assert len(set(batched)) >= 6


def draw_sequence(seed: int, steps: int = 20) -> list[int]:
    logits, g = torch.zeros(1, 32), gen(seed)
    return [sample(logits, [SamplingParams(seed=seed)], generators=[g])[0] for _ in range(steps)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    assert draw_sequence(5) == draw_sequence(5)
    assert draw_sequence(5) != draw_sequence(6)


def test_row_does_not_depend_on_the_rest_of_the_batch():
    logits = random_logits(6, seed=4)
    target = SamplingParams(temperature=1.3, top_p=0.9, seed=11)
    alone = sample(logits[2:3], [target], generators=[gen(11)])[0]
    others = [SamplingParams(temperature=0.0), SamplingParams(top_k=3, seed=1),
              SamplingParams(min_p=0.2), SamplingParams(repetition_penalty=2.0),
              SamplingParams(temperature=0.5, presence_penalty=1.0, seed=2)]
    params = others[:2] + [target] + others[2:]
    gens = [None, gen(1), gen(11), None, None, gen(2)]
    torch.manual_seed(99)
    in_batch = sample(logits, params, outputs=[[1, 2]] * 6, generators=gens)
    assert in_batch[2] == alone


# ---- penalties ----

def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 4.0]])
    batch = make_batch([SamplingParams(repetition_penalty=2.0)], prompts=[[0, 1]], outputs=[[1, 3]])
    apply_penalties(logits, batch)
    assert logits.tolist() == [[1.0, -4.0, 3.0, -2.0, 4.0]]  # seen: 0, 1, 3 (once each)


def test_frequency_and_presence_penalties_use_output_counts_only():
    logits = torch.zeros(1, 5)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=1.5)
    apply_penalties(logits, make_batch([params], prompts=[[4, 4]], outputs=[[1, 1, 1, 2]]))
    assert logits.tolist() == [[0.0, -3.0, -2.0, 0.0, 0.0]]  # 0.5*3+1.5, 0.5*1+1.5; prompt free


def test_negative_presence_penalty_encourages():
    logits = torch.zeros(1, 4)
    apply_penalties(logits, make_batch([SamplingParams(presence_penalty=-1.0)],
                                       outputs=[[2, 2]]))
    assert logits.tolist() == [[0.0, 0.0, 1.0, 0.0]]


def test_penalties_match_reference_and_leave_input_alone():
    rng = random.Random(0)
    logits = random_logits(8, seed=5)
    before = logits.clone()
    params = [SamplingParams(temperature=rng.choice([0.0, 1.0]),
                             repetition_penalty=rng.choice([1.0, 0.5, 1.3]),
                             frequency_penalty=rng.choice([0.0, 0.7, -0.4]),
                             presence_penalty=rng.choice([0.0, 1.1, -2.0])) for _ in range(8)]
    prompts = [[rng.randrange(VOCAB) for _ in range(5)] for _ in range(8)]
    outputs = [[rng.randrange(VOCAB) for _ in range(rng.randrange(6))] for _ in range(8)]
    work = logits.clone()
    apply_penalties(work, make_batch(params, prompts=prompts, outputs=outputs))
    for i, p in enumerate(params):
        expected = reference_penalize_row(logits[i], p, prompts[i], outputs[i])
        torch.testing.assert_close(work[i], expected, rtol=0, atol=1e-6)
    Sampler()(logits, make_batch(params, prompts=prompts, outputs=outputs))
    assert torch.equal(logits, before)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    assert sample(logits, params, prompts=[[0]]) == [1]
    assert sample(logits, params, prompts=[[2]]) == [0]


# ---- min_tokens ----

def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(3, VOCAB)
    logits[:, EOS] = logits[:, 3] = 10.0
    logits[:, 5] = 5.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3])
    assert sample(logits, [params] * 3, outputs=[[], [1], [1, 1]]) == [5, 5, 3]


def test_min_tokens_with_ignore_eos_masks_only_stop_ids():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 3] = 10.0, 9.0
    params = SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[3], ignore_eos=True)
    assert sample(logits, [params]) == [EOS]


def test_min_tokens_ignores_stop_ids_outside_vocab():
    params = SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[VOCAB + 100])
    logits = random_logits(1)
    assert sample(logits, [params]) == logits.argmax(-1).tolist()


def test_min_tokens_applies_to_random_rows():
    logits = torch.zeros(500, VOCAB)
    logits[:, EOS] = 5.0
    torch.manual_seed(0)
    assert EOS not in sample(logits, [SamplingParams(min_tokens=3)] * 500)


# ---- logprobs ----

def test_logprobs_are_log_softmax_of_penalized_logits():
    logits = random_logits(3, seed=6)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(),
              SamplingParams(temperature=0.7, logprobs=0, repetition_penalty=2.0, seed=1)]
    batch = make_batch(params, prompts=[[0, 1]] * 3, generators=[None, None, gen(1)])
    out = Sampler()(logits, batch)
    penalized = torch.stack([reference_penalize_row(logits[i], p, [0, 1], [])
                             for i, p in enumerate(params)])
    expected = torch.log_softmax(penalized, -1)
    assert out.top_token_ids.shape == out.top_logprobs.shape == (3, 3)
    torch.testing.assert_close(out.logprobs, expected.gather(1, out.token_ids[:, None])[:, 0])
    top = expected.topk(3, -1)
    torch.testing.assert_close(out.top_logprobs, top.values)
    assert torch.equal(out.top_token_ids, top.indices)
    lists = out.logprob_lists([p.logprobs for p in params])
    assert lists[1] is None and lists[2][1] == {}
    chosen, alternatives = lists[0]
    assert chosen == pytest.approx(expected[0].max().item())
    assert list(alternatives) == top.indices[0].tolist()


def test_logprobs_on_fast_path():
    logits = random_logits(2).to(torch.bfloat16)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0, logprobs=2)] * 2))
    expected = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(out.logprobs, expected.max(-1).values)
    assert out.top_logprobs.shape == (2, 2)


def test_no_logprobs_requested_gives_none():
    out = Sampler()(random_logits(2), make_batch([SamplingParams()] * 2))
    assert out.logprobs is None and out.logprob_lists([None, None]) == [None, None]


# ---- batched against reference ----

def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.3, 1.0, 1.7]), top_k=rng.choice([0, 1, 3, 8, 40]),
        top_p=rng.choice([1.0, 0.9, 0.5, 0.1]), min_p=rng.choice([0.0, 0.05, 0.3]),
        repetition_penalty=rng.choice([1.0, 1.2, 0.8]),
        frequency_penalty=rng.choice([0.0, 0.5]), presence_penalty=rng.choice([0.0, -0.5, 1.0]),
        min_tokens=rng.choice([0, 0, 3]), stop_token_ids=rng.choice([[], [2, 7]]),
        logprobs=rng.choice([None, 0, 4]))


@pytest.mark.parametrize("seed", range(5))
def test_batched_equals_reference_with_same_generators(seed):
    rng, rows = random.Random(seed), 32
    params = [random_params(rng) for _ in range(rows)]
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 6))] for _ in range(rows)]
    outputs = [[rng.randrange(VOCAB) for _ in range(rng.randrange(5))] for _ in range(rows)]
    batched_gens = [gen(1000 * seed + i) for i in range(rows)]
    reference_gens = [gen(1000 * seed + i) for i in range(rows)]
    for step in range(4):
        logits = random_logits(rows, seed=100 * seed + step)
        batch = make_batch(params, prompts=prompts, outputs=outputs, generators=batched_gens)
        got = Sampler()(logits, batch).token_ids.tolist()
        want = [reference_sample_row(logits[i], params[i], prompts[i], outputs[i],
                                     reference_gens[i], eos_token_ids=(EOS,))
                for i in range(rows)]
        assert got == want
        outputs = [out + [token] for out, token in zip(outputs, got, strict=True)]


def test_build_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        SamplingBatch.build([SamplingParams()], [[0]], [[], []], [None], "cpu")


def test_empty_batch():
    out = Sampler()(torch.zeros(0, VOCAB), make_batch([]))
    assert out.token_ids.shape == (0,)


def test_vanishing_temperature_is_greedy_not_nan():
    """1e-38 would overflow logits / temperature to inf (NaN after softmax, token 0)."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=t, seed=1) for t in (1e-38, 1e-6, 0.0)]
    assert all(p.greedy for p in params) and not SamplingParams(temperature=1e-4).greedy
    out = Sampler()(logits, make_batch(params, generators=[torch.Generator()] * 3))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_p_below_float32_range_keeps_the_top_token():
    """1e-300 is 0.0 as float32: every token would be masked and the softmax NaN."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(6))
    params = [SamplingParams(temperature=1.0, top_p=1e-300, seed=s) for s in (1, 2)]
    out = Sampler()(logits, make_batch(params, generators=[torch.Generator().manual_seed(s)
                                                           for s in (1, 2)]))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_stop_token_ids_are_bounded():
    from kvserve.errors import InvalidRequestError
    from kvserve.request import MAX_STOP_TOKEN_IDS

    SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)))
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_STOP_TOKEN_IDS} are allowed"):
        SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))
