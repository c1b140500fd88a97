"""One cached block as bytes for a tier outside this process's memory (disk, Redis): a
safetensors file whose tensors are the block's parts and whose metadata names everything that
decides whether the bytes may be used here, with a checksum of the tensors.

decode() refuses (EntryError) anything that is not exactly what was asked for: a truncated or
corrupt file, another key, another model, KV format or layout, or tensors whose checksum does not
match. A refused entry is dropped by its tier and the block recomputed; it is never used.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

ENTRY_VERSION = "1"


class EntryError(Exception):
    """The bytes are not a usable entry for this key, model and format (the message says why)."""


@dataclass(frozen=True)
class EntryMeta:
    key: bytes
    token_ids: tuple[int, ...]
    tenant: str | None


def checksum(parts: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(parts):
        h.update(name.encode())
        h.update(parts[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode(meta: EntryMeta, parts: dict[str, torch.Tensor], identity: str, layout: str
           ) -> bytes:
    """parts: the block's host copy, by part, each [num_layers, 1, ...]."""
    tensors = {name: t.contiguous() for name, t in parts.items()}
    return save(tensors, metadata={
        "kvserve_entry": ENTRY_VERSION, "key": meta.key.hex(), "identity": identity,
        "layout": layout, "tokens": ",".join(map(str, meta.token_ids)),
        "tenant": meta.tenant or "", "sha256": checksum(tensors)})


def read_meta(metadata: dict[str, str] | None, identity: str, layout: str) -> EntryMeta:
    """The entry's key, tokens and tenant, if its metadata is this model's and layout's."""
    m = metadata or {}
    if m.get("kvserve_entry") != ENTRY_VERSION:
        raise EntryError("not a kvserve block entry (or another version)")
    if m.get("identity") != identity:
        raise EntryError("made by another model or KV format")
    if m.get("layout") != layout:
        raise EntryError("another block layout")
    try:
        tokens = tuple(int(t) for t in m["tokens"].split(",")) if m.get("tokens") else ()
        return EntryMeta(bytes.fromhex(m["key"]), tokens, m.get("tenant") or None)
    except (KeyError, ValueError) as err:
        raise EntryError(f"unreadable metadata ({err})") from None


def decode(data: bytes, key: bytes, identity: str, layout: str,
           parts: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
           ) -> tuple[EntryMeta, dict[str, torch.Tensor]]:
    """parts: each tensor's expected shape and dtype (a block's host copy): anything else is
    refused before it can reach the pool."""
    try:
        tensors = load(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError, OSError) as err:
        raise EntryError(f"truncated or corrupt ({err})") from None
    meta = read_meta(metadata, identity, layout)
    if meta.key != key:
        raise EntryError("stored under another block key")
    if parts is not None and {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()} != parts:
        raise EntryError("its tensors do not match this pool's block layout")
    try:
        ok = checksum(tensors) == metadata.get("sha256")
    except (RuntimeError, ValueError) as err:
        raise EntryError(f"unreadable tensors ({err})") from None
    if not ok:
        raise EntryError("checksum mismatch")
    return meta, tensors


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (the header is JSON after an 8-byte length)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("header longer than the entry")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}
