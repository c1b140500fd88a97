"""Attention over cached K/V: the math (ops.py), the per-step metadata, the backend protocol and
its backends (no cache, contiguous, paged)."""

from kvserve.model.attention.backend import AttentionBackend
from kvserve.model.attention.metadata import AttentionMetadata, PagedMetadata, SeqSlice

__all__ = ["AttentionBackend", "AttentionMetadata", "PagedMetadata", "SeqSlice"]
