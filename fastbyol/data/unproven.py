"""The pre-flight decode of the files the header check cannot prove safe (checks.py's "unproven": an image larger
than checks.MAX_PROVEN_PIXELS, a JPEG on the decoder's default Huffman tables).

Each such file is decoded once, before step 1, by DALI's CPU decoder in a child process
(`python -m fastbyol.data.check_worker --decode`, given (path, offset, size, name) items: a whole file, or a tar
shard's member read at its offset), in batches small enough that DALI parses the headers in the
calling thread (decode.py). A file DALI refuses, or that decodes with a native warning, is a bad file with DALI's
reason. When the child dies by a signal (a decoder crash, or the kernel's out-of-memory killer), the files of the batch
it was decoding are decoded again one by one, each in a fresh child, and the one that kills its child is a bad file:
"crashed the image decoder (SIGSEGV)". A child stopped rather than crashed (Ctrl-C: SIGINT reaches the whole process
group; SIGTERM, SIGHUP) decides nothing: Ctrl-C ends the command with exit 130, the others in one line
(fastbyol.system.children), and the child dies with its parent (a SIGKILLed trainer leaves no decoder running).
Bad files are then named in one line, or left out under --skip-bad-files, as every bad file of the manifest
(manifest.scan); the results are kept in the manifest, and, by each file's identity (cache.identity: size, mtime,
inode, ctime), in `decoded.json` beside it, so neither a later run nor a rescan decodes an unchanged file again, and
a file rewritten with its size and mtime kept is decoded again. Tar shards (shards.py) decode their unproven members
the same way while their index is built; a failing member is a bad sample of the shard, and the index is the cache.

FASTBYOL_TEST_DECODE_CRASH (tests only): a file name; the child SIGSEGVs itself when a batch it is about to decode
holds a file, or a tar member, of that base name (a stand-in for a decoder crash; a value with a "/" or empty is
ignored). FASTBYOL_TEST_DECODE_HANG (tests only), the same for a decode that takes an hour (the child sleeps: a
stand-in for a huge image, the window for a kill or a Ctrl-C).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..errors import FastByolError
from ..system.children import child_command, child_env, ctrl_c_interrupts, stopped_by_signal

DECODED = "decoded.json"  # beside the manifest: [[relpath, size, mtime_ns, inode, ctime_ns, reason or null], ...]
THREADS = 2
BATCH = 4 * (THREADS + 1)  # DALI parses a batch's headers in the calling thread up to this many (decode.py)
CRASH_ENV = "FASTBYOL_TEST_DECODE_CRASH"
HANG_ENV = "FASTBYOL_TEST_DECODE_HANG"
Item = tuple[str, int, int, str]  # (path, offset, size, name): offset -1 is the whole file; a tar member otherwise


def crash_name(variable: str = CRASH_ENV) -> str | None:
    """FASTBYOL_TEST_DECODE_CRASH (or `variable`), when it is a plain file name; None otherwise (unset, empty, or
    holding a "/")."""
    name = os.environ.get(variable, "")
    return name if name and "/" not in name and name not in (".", "..") else None


def file_items(root: str, rels: list[str]) -> list[Item]:
    """The items of files root/rel (whole files; the crash hook matches their base names)."""
    return [(os.path.join(root, r), -1, -1, r) for r in rels]


def _reader(item: Item):
    """decode.py's (name, read) of an item: the whole file, or `size` bytes at `offset` (a tar shard's member)."""
    from .checks import range_reader
    from .decode import file_item

    path, offset, size, _ = item
    return file_item(path) if offset < 0 else (f"{path}:{offset}", range_reader(path, offset, size))


def child_main(items: list[Item]) -> int:
    """The child: decode each item, BATCH at a time; after each batch one JSON line per item, [index, reason or null],
    flushed (so a parent whose child dies knows how far it got)."""
    from .decode import decode_encoded

    crash, hang = crash_name(), crash_name(HANG_ENV)
    out = sys.stdout
    for lo in range(0, len(items), BATCH):
        chunk = [tuple(it) for it in items[lo:lo + BATCH]]
        if crash is not None and any(os.path.basename(it[3]) == crash for it in chunk):
            os.kill(os.getpid(), signal.SIGSEGV)
        if hang is not None and any(os.path.basename(it[3]) == hang for it in chunk):
            time.sleep(3600)
        readers = [_reader(it) for it in chunk]
        _, _, skipped = decode_encoded(readers, 16, THREADS, skip_bad=True)
        why = dict(skipped)
        for k, (name, _) in enumerate(readers):
            out.write(json.dumps([lo + k, why.get(name)]) + "\n")
        out.flush()
    return 0


def _child(where: str, items: list[Item]) -> tuple[list[str | None], int]:
    """(reasons (None: decoded) of the first items the child finished, in order; its exit status)."""
    with ctrl_c_interrupts():  # Ctrl-C kills this child too: an interrupt (exit 130), never a decoder crash
        proc = subprocess.run(child_command("--decode"), input=json.dumps([list(it) for it in items]).encode(),
                              capture_output=True, check=False, env=child_env())
    stopped_by_signal(proc.returncode, f"{where}: the pre-flight decode")
    done: list[str | None] = []
    for line in proc.stdout.decode("utf-8", "surrogateescape").splitlines():
        try:
            k, why = json.loads(line)
        except (ValueError, TypeError):
            continue  # not ours (a library printing to stdout)
        if k == len(done):
            done.append(why)
    if proc.returncode > 0 or proc.returncode == 0 and len(done) != len(items):
        tail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise FastByolError(f"{where}: the pre-flight decode of its unproven images failed (exit {proc.returncode}"
                            f"{': ' + tail[-1][:200] if tail else ''})")
    return done, proc.returncode


def _signal_name(status: int) -> str:
    try:
        return signal.Signals(-status).name
    except ValueError:
        return f"signal {-status}"


def decode_check(where: str, items: list[Item]) -> list[str | None]:
    """For each item: None if DALI decodes it, else why not (see the module's docstring); `where` (the folder, or the
    shards) names a failure of the child itself."""
    result: list[str | None] = []
    while len(result) < len(items):
        done, status = _child(where, items[len(result):])
        result += done
        if status == 0:
            break
        for item in items[len(result):len(result) + BATCH]:  # the batch the child died in: one by one
            one, status = _child(where, [item])
            result.append(f"crashed the image decoder ({_signal_name(status)})" if status
                          else one[0] if one else None)
    return result[:len(items)]


def _read_cache(location: Path | None) -> dict:
    try:
        entries = json.loads((location / DECODED).read_text()) if location is not None else []
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(entries, list):
        return {}
    return {tuple(e[:5]): e[5] for e in entries if isinstance(e, list) and len(e) == 6 and isinstance(e[0], str)
            and all(isinstance(x, int) for x in e[1:5]) and (e[5] is None or isinstance(e[5], str))}


def prove(root: str, rels: list[str], ids, location: Path | None = None) -> list:
    """decode_check of the files not already in location/decoded.json at their identity (ids: (N, 4) size, mtime,
    inode, ctime, as check_files took them); the cache updated (whole or untouched; a folder that cannot be written
    only loses the cache)."""
    cache = _read_cache(location)
    keys = [(r, *(int(x) for x in i)) for r, i in zip(rels, ids)]
    todo = [k for k in keys if k not in cache]
    if todo:
        for k, why in zip(todo, decode_check(root, file_items(root, [k[0] for k in todo]))):
            cache[k] = why
        if location is not None:
            from .cache import atomic_write_bytes

            try:
                atomic_write_bytes(location / DECODED, json.dumps([[*k, v] for k, v in cache.items()]).encode())
            except OSError:
                pass
    return [cache[k] for k in keys]
