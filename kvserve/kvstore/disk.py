"""The disk tier's bytes: one file per cached block under a directory of this model's own, read,
written and deleted by one worker thread so that the step loop never waits on the disk.

A file is the block's entry (entry.py: safetensors, metadata naming key, model, format and
layout, and a checksum); it is written to a temporary name and renamed, so a crash leaves
either the old state or a whole file. Files of other models and formats live in other
directories (named by a digest of the model's identity) and are never read. scan() lists what
an earlier process left (a warm restart reuses it); a file that does not decode is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time

import torch
from safetensors import safe_open

from kvserve.kvstore.entry import EntryError, EntryMeta, decode, encode, read_meta
from kvserve.kvstore.tier_worker import TierLoad, TierWorker

log = logging.getLogger("kvserve.offload")
SUFFIX = ".kvblock"


class DiskStore:
    """The files (synchronous: DiskTier's worker calls these)."""

    def __init__(self, root: str, identity: str, layout: str,
                 parts: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None):
        self.identity, self.layout, self.parts = identity, layout, parts
        self.dir = os.path.join(root, hashlib.sha256(identity.encode()).hexdigest()[:16])
        os.makedirs(self.dir, exist_ok=True)

    def path(self, key: bytes) -> str:
        h = key.hex()
        return os.path.join(self.dir, h[:2], h + SUFFIX)

    def write(self, meta: EntryMeta, parts: dict[str, torch.Tensor]) -> int:
        data = encode(meta, parts, self.identity, self.layout)
        path = self.path(meta.key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return len(data)

    def read(self, key: bytes) -> tuple[EntryMeta, dict[str, torch.Tensor], int]:
        try:
            with open(self.path(key), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise EntryError("missing") from None
        meta, parts = decode(data, key, self.identity, self.layout, self.parts)
        return meta, parts, len(data)

    def delete(self, key: bytes) -> None:
        with contextlib.suppress(OSError):
            os.remove(self.path(key))

    def scan(self) -> list[EntryMeta]:
        """Entries an earlier process left, least recently written first (headers only; a
        file that is not a whole entry of this model, format and layout is deleted)."""
        found = []
        for sub in sorted(os.listdir(self.dir)):
            folder = os.path.join(self.dir, sub)
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if name.endswith(".tmp"):  # a write cut short
                    os.remove(path)
                    continue
                if not name.endswith(SUFFIX):
                    continue
                try:
                    with safe_open(path, "pt") as f:
                        meta = read_meta(f.metadata(), self.identity, self.layout)
                    if meta.key.hex() + SUFFIX != name:
                        raise EntryError("file name and key differ")
                    found.append((os.stat(path).st_mtime_ns, meta))
                except Exception as err:  # noqa: BLE001 - whatever is wrong with the file
                    log.warning("disk tier: dropping %s (%s)", path, err)
                    with contextlib.suppress(OSError):
                        os.remove(path)
        return [meta for _, meta in sorted(found, key=lambda x: x[0])]


class DiskTier(TierWorker):
    """A DiskStore behind one worker thread: writes, reads and deletes run in submission
    order."""

    name = "disk"

    def __init__(self, store: DiskStore):
        self.store = store
        self._warned = False
        super().__init__()

    def write(self, key: bytes, token_ids: tuple[int, ...], tenant: str | None,
              parts: dict[str, torch.Tensor]) -> None:
        self._jobs.put(("write", EntryMeta(key, tuple(token_ids), tenant), parts))

    def read(self, key: bytes) -> None:
        self._jobs.put(("read", key, None))

    def delete(self, key: bytes) -> None:
        self._jobs.put(("delete", key, None))

    def keys_answered_by(self, job) -> list[bytes]:
        return [job[1]] if job[0] == "read" else []

    def handle(self, op: str, arg, parts) -> None:
        if op == "write":
            try:
                self.store.write(arg, parts)
            except OSError as err:  # disk full, permissions: the block is recomputed
                if not self._warned:
                    log.warning("disk tier: cannot write %s (%s); its blocks will be "
                                "recomputed", self.store.dir, err)
                    self._warned = True
                # the index lists it: an answer that it is not there takes it out
                self._done.put(TierLoad(self.name, arg.key, False, reason=f"not written: {err}"))
        elif op == "read":
            self._done.put(self._read(arg))
        else:
            self.store.delete(arg)

    def _read(self, key: bytes) -> TierLoad:
        t0 = time.perf_counter()
        try:
            meta, parts, num_bytes = self.store.read(key)
        except (EntryError, OSError) as err:
            self.store.delete(key)
            return TierLoad(self.name, key, False, reason=str(err))
        seconds = time.perf_counter() - t0
        return TierLoad(self.name, key, True, meta.token_ids, meta.tenant, parts, num_bytes,
                        seconds, rate_sample=(num_bytes, seconds))
