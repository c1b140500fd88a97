"""Which of a sequence's blocks attention will still read: the seam for window policies.

Full history keeps every block until the sequence ends (every layer attends to every earlier
token). A sliding window or attention sinks keep fewer, so blocks outside them can go back to the
pool mid-sequence. The block manager holds one policy and reports its name; with full history,
the only policy built today, nothing is released early, so it does not consult it yet. The window
and sink policies will be asked here which blocks to release.
"""

from __future__ import annotations

from typing import Protocol


class RetentionPolicy(Protocol):
    name: str

    def kept_block_indices(self, num_tokens: int, block_size: int) -> range:
        """Indices (into the sequence's block table) of the blocks still read once the
        sequence holds num_tokens tokens; blocks outside the range can be released."""
        ...


class FullHistory:
    """Every block stays until the sequence ends."""

    name = "full"

    def kept_block_indices(self, num_tokens: int, block_size: int) -> range:
        return range(-(-num_tokens // block_size))
