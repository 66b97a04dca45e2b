"""A short fingerprint of what a dataset pretrains on, the same on every machine that holds the same data: the ranks
of a torchrun job compare theirs before the first step (fastbyol.system.agreement), so that processes started on
different data stop in one line instead of training as one job.

- An array (N, H, W, C): its shape and dtype, and the bytes of SAMPLE_ROWS rows evenly spaced over it (a memory map
  reads only those): another array of the same shape almost always differs in one of them.
- Image folders (a FileList): DALI's file list the manifest wrote (relative paths and labels, so copies of the same
  folder at different places on different hosts agree), or the listed paths relative to the folder.
- Tar shards: each shard's name and its index (every sample's offset, size and name, also root-independent).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

SAMPLE_ROWS = 1024  # rows of an array hashed whole
_CHUNK = 1 << 20


def _file_into(h, path: str) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def source_fingerprint(source) -> str:
    """16 hex digits identifying a pretraining source: a uint8 array, a FileList or a ShardSource (see the module)."""
    h = hashlib.blake2b(digest_size=8)
    if isinstance(source, np.ndarray):
        h.update(f"array {source.shape} {source.dtype.str}".encode())
        if len(source):
            rows = np.unique(np.linspace(0, len(source) - 1, min(len(source), SAMPLE_ROWS)).astype(np.int64))
            h.update(np.ascontiguousarray(source[rows]).tobytes())
        return h.hexdigest()
    index = getattr(source, "source_index", None)
    if index is not None:  # tar shards: name and index of each, in order
        for path, idx in zip(source.paths, index):
            h.update(f"shard {os.path.basename(path)}\n".encode("utf-8", "surrogateescape"))
            _file_into(h, idx)
        return h.hexdigest()
    listing = getattr(source, "source_list", None)
    h.update(f"files {len(source)}\n".encode())
    if listing:  # the manifest's DALI file list: "relpath label" lines
        _file_into(h, listing)
    else:
        where = getattr(source, "where", "") or ""
        for path in source.files:
            h.update((os.path.relpath(path, where) if where else path).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()
