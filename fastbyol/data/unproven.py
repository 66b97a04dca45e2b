"""The pre-flight decode of the files the header check cannot prove safe (checks.py's "unproven": an image larger
than checks.MAX_PROVEN_PIXELS, a JPEG on the decoder's default Huffman tables).

Each such file is decoded once, before step 1, by DALI's CPU decoder in a child process
(`python -m fastbyol.data.check_worker --decode ROOT`), in batches small enough that DALI parses the headers in the
calling thread (decode.py). A file DALI refuses, or that decodes with a native warning, is a bad file with DALI's
reason. When the child dies by a signal (a decoder crash, or the kernel's out-of-memory killer), the files of the batch
it was decoding are decoded again one by one, each in a fresh child, and the one that kills its child is a bad file:
"crashed the image decoder (SIGSEGV)". Bad files are then named in one line, or left out under --skip-bad-files, as
every bad file of the manifest (manifest.scan); the results are kept in the manifest, and, by size and mtime, in
`decoded.json` beside it, so neither a later run nor a rescan decodes an unchanged file again.

FASTBYOL_TEST_DECODE_CRASH (tests only): a file name; the child SIGSEGVs itself when a batch it is about to decode
holds a file of that name (a stand-in for a decoder crash; a value with a "/" or empty is ignored).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import FastByolError

DECODED = "decoded.json"  # beside the manifest: [[relpath, size, mtime_ns, reason or null], ...]
THREADS = 2
BATCH = 4 * (THREADS + 1)  # DALI parses a batch's headers in the calling thread up to this many (decode.py)
CRASH_ENV = "FASTBYOL_TEST_DECODE_CRASH"


def crash_name() -> str | None:
    """FASTBYOL_TEST_DECODE_CRASH, when it is a plain file name; None otherwise (unset, empty, or holding a "/")."""
    name = os.environ.get("FASTBYOL_TEST_DECODE_CRASH", "")
    return name if name and "/" not in name and name not in (".", "..") else None


def child_main(root: str, rels: list[str]) -> int:
    """The child: decode root/rel for each rel, BATCH at a time; after each batch one JSON line per file,
    [index, reason or null], flushed (so a parent whose child dies knows how far it got)."""
    from .decode import decode_encoded, file_item

    crash = crash_name()
    out = sys.stdout
    for lo in range(0, len(rels), BATCH):
        chunk = rels[lo:lo + BATCH]
        if crash is not None and any(os.path.basename(r) == crash for r in chunk):
            os.kill(os.getpid(), signal.SIGSEGV)
        items = [file_item(os.path.join(root, r)) for r in chunk]
        _, _, skipped = decode_encoded(items, 16, THREADS, skip_bad=True)
        why = dict(skipped)
        for k, r in enumerate(chunk):
            out.write(json.dumps([lo + k, why.get(os.path.join(root, r))]) + "\n")
        out.flush()
    return 0


def _child(root: str, rels: list[str]) -> tuple[list[str | None], int]:
    """(reasons (None: decoded) of the first files the child finished, in order; its exit status)."""
    proc = subprocess.run([sys.executable, "-m", "fastbyol.data.check_worker", "--decode", root],
                          input="\n".join(rels).encode("utf-8", "surrogateescape"), capture_output=True, check=False)
    done: list[str | None] = []
    for line in proc.stdout.decode("utf-8", "surrogateescape").splitlines():
        try:
            k, why = json.loads(line)
        except (ValueError, TypeError):
            continue  # not ours (a library printing to stdout)
        if k == len(done):
            done.append(why)
    if proc.returncode > 0 or proc.returncode == 0 and len(done) != len(rels):
        tail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise FastByolError(f"{root}: the pre-flight decode of its unproven images failed (exit {proc.returncode}"
                            f"{': ' + tail[-1][:200] if tail else ''})")
    return done, proc.returncode


def _signal_name(status: int) -> str:
    try:
        return signal.Signals(-status).name
    except ValueError:
        return f"signal {-status}"


def decode_check(root: str, rels: list[str]) -> list[str | None]:
    """For each file root/rel: None if DALI decodes it, else why not (see the module's docstring)."""
    result: list[str | None] = []
    while len(result) < len(rels):
        done, status = _child(root, rels[len(result):])
        result += done
        if status == 0:
            break
        for rel in rels[len(result):len(result) + BATCH]:  # the batch the child died in: one by one
            one, status = _child(root, [rel])
            result.append(f"crashed the image decoder ({_signal_name(status)})" if status
                          else one[0] if one else None)
    return result[:len(rels)]


def _read_cache(location: Path | None) -> dict:
    try:
        entries = json.loads((location / DECODED).read_text()) if location is not None else []
    except (OSError, ValueError):
        return {}
    return {(e[0], e[1], e[2]): e[3] for e in entries if isinstance(e, list) and len(e) == 4} \
        if isinstance(entries, list) else {}


def prove(root: str, rels: list[str], sizes: list[int], mtimes: list[int], location: Path | None = None) -> list:
    """decode_check of the files not already in location/decoded.json at their size and mtime; the cache updated
    (whole or untouched; a folder that cannot be written only loses the cache)."""
    cache = _read_cache(location)
    keys = [(r, int(s), int(m)) for r, s, m in zip(rels, sizes, mtimes)]
    todo = [k for k in keys if k not in cache]
    if todo:
        for k, why in zip(todo, decode_check(root, [k[0] for k in todo])):
            cache[k] = why
        if location is not None:
            from .cache import atomic_write_bytes

            try:
                atomic_write_bytes(location / DECODED, json.dumps([[*k, v] for k, v in cache.items()]).encode())
            except OSError:
                pass
    return [cache[k] for k in keys]
