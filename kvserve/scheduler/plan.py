"""What crosses the scheduler/runner boundary each step: StepPlan in, StepResult out (no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduledSeq:
    """Feed `token_ids` at positions [start_position, start_position + len(token_ids))."""

    request_id: str
    token_ids: tuple[int, ...]
    start_position: int
    sample: bool = True  # False for a prefill chunk that does not reach the prompt's end


@dataclass(frozen=True)
class StepPlan:
    seqs: tuple[ScheduledSeq, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(frozen=True)
class SampledToken:
    request_id: str
    token_id: int
    # (logprob of token_id, {top token id: logprob}) when the request asked for logprobs
    logprobs: tuple[float, dict[int, float]] | None = None


@dataclass(frozen=True)
class StepResult:
    sampled: tuple[SampledToken, ...]
