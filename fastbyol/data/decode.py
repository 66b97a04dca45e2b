"""Decoding the kNN monitor's images, safely and off the critical path.

`decode_encoded(items, size)` turns encoded JPEG/PNG bytes into (N, size, size, 3) uint8 (shorter side resized to
`size`, bicubic, centre crop; DALI on the CPU), `decode_files` does it for paths, and `BackgroundDecode` runs such
a job in a thread so training starts while the images decode; the trainer waits on it only when it first needs them.

Safety: every item is read here, checked (checks.py) and fed to DALI through external_source, in batches
of at most 4 x (threads + 1): DALI's decoder then parses headers in the calling thread, where a parse error is
raised as an exception (on its worker threads, DALI 2.4 loses the error and then segfaults decoding the unparsed
sample; see checks.py). When a batch fails anyway (data damaged past the headers), each of its items is decoded
alone to find the culprit, which is named in one FastByolError, or skipped and counted with skip_bad.
"""

from __future__ import annotations

import atexit
import os
import re
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import FastByolError
from ..system.native import fold, native_stderr
from .checks import check_bytes, open_regular

EncodedItem = tuple[str, Callable[[], bytes]]  # (name for messages, read the bytes)


def _pipeline(size: int, batch_size: int, num_threads: int, feed):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def eval_pipe():
        encoded = fn.external_source(source=feed, batch=True, dtype=types.UINT8, no_copy=False)
        images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        images = fn.resize(images, resize_shorter=size, interp_type=types.INTERP_CUBIC)
        return fn.crop(images, crop=(size, size), out_of_bounds_policy="pad")

    pipe = eval_pipe(batch_size=batch_size, num_threads=num_threads, device_id=None, seed=0,
                     prefetch_queue_depth=1, exec_pipelined=False, exec_async=False)
    with native_stderr():  # native notes while it builds (optional codec extensions that cannot load): dropped
        pipe.build()
    return pipe


class _Feed:
    """external_source callback: the next batch set by the caller (so a failed batch can be retried item by item)."""

    def __init__(self):
        self.batch: list[np.ndarray] = []

    def __call__(self):
        return self.batch


def _decode_one_by_one(pipe_factory, blobs: list[np.ndarray]) -> list[np.ndarray | str]:
    """Each blob alone in a batch of one: its (size, size, 3) pixels, or DALI's error message."""
    out = []
    feed = _Feed()
    pipe = pipe_factory(1, feed)
    for b in blobs:
        feed.batch = [b]
        try:
            with native_stderr() as printed:
                (res,) = pipe.run()
            if printed.first_line():  # decoded, but libjpeg/libpng warned: pixels that cannot be trusted
                out.append(f"the native decoder warned: {printed.first_line()[:200]}")
            else:
                out.append(np.array(res[0]))  # a copy: DALI reuses its output buffers
        except RuntimeError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip() and "pipeline" not in ln.lower()]
            out.append(fold(lines[-1] if lines else "DALI could not decode it", printed))
            feed = _Feed()
            pipe = pipe_factory(1, feed)  # a pipeline that raised is no longer valid
    return out


def decode_encoded(items: Sequence[EncodedItem], size: int, num_threads: int = 2, skip_bad: bool = False,
                   cancel: threading.Event | None = None) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(images (M, size, size, 3) uint8, kept (M,) indices into items, [(name, reason)] skipped).

    Without skip_bad, the first item that cannot be read, checked or decoded raises FastByolError naming it."""
    batch_size = 4 * (num_threads + 1)  # at most this many: DALI parses the headers in this thread (see above)
    feed = _Feed()

    def factory(bs, f):
        return _pipeline(size, bs, num_threads, f)

    pipe = factory(batch_size, feed)
    images, kept, skipped = [], [], []

    def bad(name: str, why: str):
        if not skip_bad:
            raise FastByolError(f"{name}: {why} (--skip-bad-files leaves such files out and counts them)")
        skipped.append((name, why))

    for lo in range(0, len(items), batch_size):
        if cancel is not None and cancel.is_set():
            raise FastByolError("decoding the kNN images was cancelled")
        blobs, idx = [], []
        for i in range(lo, min(lo + batch_size, len(items))):
            name, read = items[i]
            try:
                data = read()
            except OSError as e:
                bad(name, f"unreadable ({e.strerror})")
                continue
            problem = check_bytes(data, os.path.splitext(name)[1])
            if problem is not None:
                bad(name, problem)
                continue
            blobs.append(np.frombuffer(data, dtype=np.uint8))
            idx.append(i)
        if not blobs:
            continue
        feed.batch = blobs  # external_source takes batches of any size up to batch_size
        try:
            with native_stderr() as printed:  # libjpeg/libpng/DALI messages: folded into ours, never printed
                (res,) = pipe.run()
            decoded = [np.array(res[j]) for j in range(len(blobs))]  # copies: DALI reuses its buffers
            if printed.first_line():  # a native warning: find the item(s) that caused it, one by one
                decoded = _decode_one_by_one(factory, blobs)
        except RuntimeError:
            feed = _Feed()
            pipe = factory(batch_size, feed)
            decoded = _decode_one_by_one(factory, blobs)
        for i, d in zip(idx, decoded):
            if isinstance(d, str):
                bad(items[i][0], f"DALI cannot decode it ({d})")
            else:
                images.append(d)
                kept.append(i)
    if not images:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64), skipped
    return np.stack(images), np.asarray(kept, np.int64), skipped


def decode_splits(train_items, train_y, test_items, test_y, size: int, num_threads: int, skip_bad: bool,
                  cancel: threading.Event | None = None):
    """decode_encoded of the training items and, when given, the test items: (x, y, test_x, test_y, skipped), the
    labels kept in step with the images that decoded (y / test_x / test_y None where not given)."""
    x, kept, skipped = decode_encoded(train_items, size, num_threads, skip_bad, cancel)
    y = None if train_y is None else train_y[kept]
    tx = ty = None
    if test_items is not None:
        tx, tkept, tskipped = decode_encoded(test_items, size, num_threads, skip_bad, cancel)
        ty, skipped = test_y[tkept], skipped + tskipped
    return x, y, tx, ty, skipped

def file_item(path: str) -> EncodedItem:
    def read() -> bytes:
        with os.fdopen(open_regular(path), "rb") as f:  # never a FIFO or a device (they block or never end)
            return f.read()

    return path, read


def decode_files(files: Sequence[str], size: int, num_threads: int = 2, skip_bad: bool = False) -> np.ndarray:
    """(N, size, size, 3) uint8 of image files (FastByolError naming the first bad one; skip_bad leaves them out)."""
    images, _, _ = decode_encoded([file_item(f) for f in files], size, num_threads, skip_bad)
    return images


class BackgroundDecode:
    """Runs `job(cancel_event)` in a daemon thread at nice 10 (training comes first); result() waits for it
    (re-raising its error in the caller).

    The process waits for the job at exit only until the current batch ends (the job checks the event), so DALI's
    pipeline is never torn down by interpreter shutdown mid-batch."""

    def __init__(self, job: Callable[[threading.Event], object], background: bool = True):
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._result = None
        self._error: BaseException | None = None
        self.seconds: float | None = None
        if background:
            self._thread = threading.Thread(target=self._run, args=(job,), name="fastbyol-eval-decode", daemon=True)
            self._thread.start()
            atexit.register(self.cancel)
        else:
            self._thread = None
            self._run(job)

    def _run(self, job):
        t0 = time.perf_counter()
        if self._thread is not None:
            try:  # Linux: a thread's own nice value; DALI's threads started from here inherit it
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            except (AttributeError, OSError):
                pass
        try:
            self._result = job(self._cancel)
        except BaseException as e:  # re-raised in the thread that waits
            self._error = e
        finally:
            self.seconds = time.perf_counter() - t0
            self._done.set()

    def ready(self) -> bool:
        return self._done.is_set()

    @property
    def failed(self) -> bool:
        """True once the job has ended with an error (result() re-raises it)."""
        return self._done.is_set() and self._error is not None

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        self._cancel.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=30)


_FAILED = re.compile(r"Failed to decode sample #\d+ : ([^\n]+)|File mapping failed: ([^\n]+)")


def failed_sample(source, error_text: str) -> str | None:
    """The file (or `shard.tar:offset:member`) a DALI decode error names, completed with the source's root; None if
    the message names none. For the training pipeline's error path: `str(e)` of DALI's RuntimeError."""
    m = _FAILED.search(error_text)
    info = "" if m is None else (m.group(1) or m.group(2) or "").strip()
    return _sample_name(source, info) if info else None


def _sample_name(source, info: str) -> str:
    root = getattr(source, "root", None)
    return info if os.path.isabs(info) or not root else os.path.join(root, info)


def _varint(b: bytes, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 127) << shift
        shift += 7
        if c < 128:
            return v, i


def _fields(b: bytes) -> list[tuple[int, bytes, bytes]]:
    """(field number, the field's raw bytes, its payload) of a protobuf message of varint and bytes fields."""
    out, i = [], 0
    while i < len(b):
        key, j = _varint(b, i)
        if key & 7 == 2:
            n, j = _varint(b, j)
            out.append((key >> 3, b[i:j + n], b[j:j + n]))
            i = j + n
        elif key & 7 == 0:
            _, j = _varint(b, j)
            out.append((key >> 3, b[i:j], b""))
            i = j
        else:
            raise ValueError(f"protobuf wire type {key & 7}")
    return out


def _op_name(entry: bytes) -> bytes:
    return next((payload for f, _, payload in _fields(entry) if f == 1), b"")


def _reader_checkpoint(full: bytes, reader_only: bytes) -> bytes:
    """The checkpoint of a reader-only pipeline (`reader_only`: its own, fresh) at the reader position of `full`, a
    checkpoint of the training pipeline: DALI's Checkpoint message holds one (name, state) entry per operator
    (field 1); the reader's entry, found by name, is carried over, the rest stays the reader-only pipeline's."""
    theirs = {_op_name(payload): raw for f, raw, payload in _fields(full) if f == 1}
    return b"".join(theirs.get(_op_name(payload), raw) if f == 1 else raw for f, raw, payload in _fields(reader_only))


def batch_culprit(source, checkpoint: bytes, shard_id: int, num_shards: int, batch_size: int,
                  num_threads: int = 2) -> tuple[str, str] | None:
    """(sample name, why) of the sample that made a training batch fail when DALI's error names none (a header its
    parser rejects on a worker thread reports `nvImageCodec failure`, a file gone since the manifest `File mapping
    failed`), or None if none is found. `checkpoint`: the training pipeline's DALI checkpoint taken before that batch.

    The batch's encoded samples are read again by a reader-only pipeline restored at the reader's position in
    `checkpoint` (nothing decoded), each is checked (checks.py) and the rest decoded one by one (decode_encoded): the
    first that fails is the one."""
    from nvidia.dali import pipeline_def

    def graph():
        encoded, _ = source.dali_reader(shard_id, num_shards, name="reader")
        return encoded

    def build(cpt):
        pipe = pipeline_def(graph)(batch_size=batch_size, num_threads=1, device_id=None, seed=0,
                                   enable_checkpointing=True, exec_dynamic=True, checkpoint=cpt)
        with native_stderr():
            pipe.build()
        return pipe

    try:
        fresh = build(None).checkpoint()
        full = checkpoint if isinstance(checkpoint, bytes) else checkpoint.encode("latin-1")
        (encoded,) = build(_reader_checkpoint(full, fresh)).run()
        samples = [(_sample_name(source, encoded[i].source_info()), np.array(encoded[i]).tobytes())
                   for i in range(len(encoded))]
    except (RuntimeError, ValueError, IndexError) as e:
        name = failed_sample(source, str(e))  # the reader itself failed: a file gone since the manifest
        return None if name is None else (name, "cannot be read (gone since the pre-flight check)")
    for name, data in samples:
        problem = check_bytes(data, os.path.splitext(name)[1])
        if problem is not None:
            return name, f"{problem}; it changed since the pre-flight check"
    items = [(name, (lambda d=data: d)) for name, data in samples]
    _, _, skipped = decode_encoded(items, 16, num_threads, skip_bad=True)
    return skipped[0] if skipped else None


def dali_reason(text: str) -> str:
    """DALI's error in one short line: the first line after its "encountered:" (the operator's traceback and the
    "Critical error in pipeline" lines are context), else its first line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1][:300]
    return lines[0][:300] if lines else "no message"


def batch_failure(source, error_text: str, checkpoint, shard_id: int, num_shards: int, batch_size: int,
                  num_threads: int) -> tuple[str | None, str]:
    """(the sample a failed training batch's DALI error names, else the one batch_culprit finds, else None; why)."""
    bad = failed_sample(source, error_text)
    if bad is not None:
        why = dali_reason(error_text)
        return bad, ("cannot be read (gone since the pre-flight check)" if why.startswith("File mapping")
                     else f"does not decode (DALI: {why})")
    found = batch_culprit(source, checkpoint, shard_id, num_shards, batch_size, num_threads)
    return found if found is not None else (None, dali_reason(error_text))
