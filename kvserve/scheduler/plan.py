"""What crosses the scheduler/runner boundary each step: StepPlan in, StepResult out (no torch)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable
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
    # With several KV groups (kvcache/groups.py), the tables of the groups after the first
    # (block_ids is the first's); each is indexed as block_ids is.
    group_block_ids: tuple[tuple[int, ...], ...] = ()


class Tier(str, enum.Enum):
    """Where a block's K/V can be: the device pool, or a copy in host memory."""

    DEVICE = "device"
    HOST = "host"


TransferKey = Hashable  # a block copy's name in a lower tier


@dataclass(frozen=True)
class BlockTransfer:
    """Copy blocks between the device pool and a lower tier, before the step's forward.

    block_ids are device block ids (read when src is DEVICE, written when dst is DEVICE);
    block_keys name the copies in the other tier, one per block. A swap preemption is the case
    request_id set: its keys belong to that request and die with it. Without request_id the
    keys are block keys of the prefix cache's host tier: copied down when the pool evicts them,
    copied up (the host keeps its copy) on a hit there.
    """

    src: Tier
    dst: Tier
    block_ids: tuple[int, ...]
    block_keys: tuple[TransferKey, ...]
    request_id: str | None = None

    def __post_init__(self) -> None:
        if len(self.block_ids) != len(self.block_keys):
            raise ValueError(f"{len(self.block_ids)} block ids but {len(self.block_keys)} keys")
        if (self.src is Tier.DEVICE) == (self.dst is Tier.DEVICE):
            raise ValueError(f"a transfer moves blocks to or from the device, not "
                             f"{self.src.value} -> {self.dst.value}")


def swap_keys(request_id: str, num_blocks: int) -> tuple[str, ...]:
    """The host-copy keys of a swapped-out request's blocks, in table order."""
    return tuple(f"swap/{request_id}/{i}" for i in range(num_blocks))


@dataclass(frozen=True)
class StepPlan:
    seqs: tuple[ScheduledSeq, ...]
    # Run in order before the forward: copies off the device come first, so the blocks they
    # free can be handed to others (and written) in this same step.
    transfers: tuple[BlockTransfer, ...] = ()
    # Requests preempted to recompute since the last plan: their K/V are gone, so the runner
    # forgets what it kept beside their blocks (a residual window).
    dropped: tuple[str, ...] = ()
    # Host copies of cached blocks that the host tier's LRU pushed out: forgotten after the
    # transfers above have run (a block fetched in this plan may be among them).
    host_drops: tuple[TransferKey, ...] = ()
    # The disk and Redis tiers' operations (kvcache.tiers.DiskOp: write a host copy down, read
    # an entry into host memory, delete one; RedisOp: put a just-cached device block, read a
    # run), handed to their workers in this order: Redis puts read the pool before the
    # transfers write it, the rest after the transfers and before host_drops.
    tier_io: tuple = ()
    # Multi-step decode: every seq feeds one token and samples greedily, with slots for
    # num_steps tokens; the runner feeds each step's token to the next (decode_step(i) below)
    num_steps: int = 1

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    def decode_step(self, i: int, token_ids: dict[str, int],
                    running: set[str] | None = None) -> StepPlan:
        """Step i of a multi-step plan as a plan of its own: each seq (of `running`, if given)
        feeds token_ids[request id], the token step i - 1 sampled (step 0: the plan's own), at
        start_position + i, with the same block tables."""
        return StepPlan(tuple(
            dataclasses.replace(s, token_ids=(token_ids[s.request_id],) if i else s.token_ids,
                                start_position=s.start_position + i)
            for s in self.seqs if running is None or s.request_id in running))


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
