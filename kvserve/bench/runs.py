"""What the cache lab records: one sample per generated token, one run per cache mode, and the
lab's result (the runs compared with the first). Plain data, shared by cache_lab.py (which fills
it) and report.py (which writes it out)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepSample:
    token_index: int  # which generated token this step produced (0 = the prefill step)
    context_len: int  # tokens the step's forward pass attended over (prompt + earlier outputs)
    step_s: float
    kv_projections: int  # cumulative K/V projections (tokens x layers) since the run began
    kv_bytes: int  # KV memory the cache holds after the step
    kv_blocks: int | None  # paged mode: blocks held


@dataclass
class ModeRun:
    mode: str
    num_layers: int
    kv_bytes_per_token: int
    block_size: int | None
    token_ids: list[int] = field(default_factory=list)
    samples: list[StepSample] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(s.step_s for s in self.samples)

    @property
    def kv_projections(self) -> int:
        return self.samples[-1].kv_projections if self.samples else 0

    @property
    def peak_kv_bytes(self) -> int:
        return max((s.kv_bytes for s in self.samples), default=0)


@dataclass
class CacheLabResult:
    model: str
    dtype: str
    device: str
    prompt_tokens: int
    new_tokens: int
    runs: list[ModeRun]

    @property
    def baseline(self) -> ModeRun:
        return self.runs[0]

    def first_mismatch(self, run: ModeRun) -> int | None:
        """Index of the first generated token where `run` differs from the baseline."""
        for i, (a, b) in enumerate(zip(self.baseline.token_ids, run.token_ids)):
            if a != b:
                return i
        if len(self.baseline.token_ids) != len(run.token_ids):
            return min(len(self.baseline.token_ids), len(run.token_ids))
        return None

    def tokens_match(self) -> bool:
        return all(self.first_mismatch(r) is None for r in self.runs[1:])
