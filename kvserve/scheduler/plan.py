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
    # The request's whole block table after this step's allocation (paged cache only):
    # position p lives in block_ids[p // block_size], slot p % block_size.
    block_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SwapOut:
    """Copy these device blocks to host memory before the step (they are then reused)."""

    request_id: str
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class SwapIn:
    """Copy the request's host copy back into these freshly allocated device blocks."""

    request_id: str
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    seqs: tuple[ScheduledSeq, ...]
    swap_out: tuple[SwapOut, ...] = ()
    swap_in: tuple[SwapIn, ...] = ()

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
class PromptScores:
    """Prompt tokens [first, first + len(entries)) scored by this step (prompt_logprobs)."""

    request_id: str
    first: int
    entries: tuple[tuple[float, dict[int, float]], ...]


@dataclass(frozen=True)
class StepResult:
    sampled: tuple[SampledToken, ...]
    prompt_scores: tuple[PromptScores, ...] = ()
