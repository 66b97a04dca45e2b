"""WebDataset tar shards: read by DALI's webdataset reader, indexed once, and written by `fastbyol shards SRC DST`.

Large runs keep their data in a few hundred big tar files (sequential reads, friendly to network filesystems and
object stores). A sample is the group of consecutive members sharing a key (the name up to the first dot of its
base name): the image in `jpg`/`jpeg`/`png`, the class index in `cls` (ASCII digits), as WebDataset writes them.

`--data` forms: 'DIR/train-{000000..000146}.tar' (braces: zero-padded numeric ranges `{a..b}` and lists `{x,y}`),
a folder of .tar files (with `train-*.tar` and `test-*.tar`, those are the two splits; otherwise every .tar
pretrains), or one .tar file. Shards named train-* get the kNN queries from the `test-*.tar` beside them.

Index, built once per shard (like the manifest of a folder; rank 0 under a lock, or before the barrier): the
member headers are walked (tar header checksums verified), each sample's image checked structurally (checks.py:
head and tail reads inside the tar, no decode) and its `cls` parsed; the result is DALI's index file (v1.2,
listing only the good samples, so DALI never reads a bad one) plus `<shard>.meta.npz` (the shard's identity,
its bad samples with the reason, and per sample the label, whether the image has one grey channel, and the
image's offset and size, which the kNN decode reads directly). An image the check passes but cannot prove safe
(checks.py's "unproven": over checks.MAX_PROVEN_PIXELS, or a JPEG on the decoder's default Huffman tables) is
decoded once while the index is built, in a child process, its bytes read at its offset (unproven.py, shared with
the image folders' manifest): one DALI refuses, that decodes with a native warning, or that crashes the decoder is a
bad sample like any other, so the index (and its cache) holds the result and an unchanged shard is never decoded
again; shards whose images are all proven start no child. Both files live in DIR/.fastbyol/shards/ when DIR is
this user's, else in the cache folder (cache.py), and are rebuilt when the shard's identity (cache.identity: size,
mtime, inode, ctime; a shard rewritten with its size and mtime kept changes its ctime) changes or the meta
file fails its CRC. Bad input (a missing shard, a brace pattern matching nothing,
a truncated tar, a sample without an image, an image that fails the check) is one FastByolError naming the shard
and sample; with --skip-bad-files a bad sample is left out of the index and counted (a truncated tar keeps its
whole samples).

Reading (`ShardSource.dali_reader`): every rank opens the shards with the same indexes and reads its own
contiguous part of the samples (`shard_id`/`num_shards`; DALI moves each rank to the next part every epoch). DALI's
webdataset reader shuffles through a buffer (`random_shuffle`, `initial_fill` samples) rather than a full
permutation (its `shuffle_after_epoch` only reorders whole tar files: measured), so `fastbyol shards` writes the
samples in a seeded random order: each buffer is class-mixed. Resume is exact through DALI's checkpointing
(tested: the batches after a restored checkpoint equal the uninterrupted ones).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import FastByolError
from ..run.disk import FolderLock
from ..run.outputs import refuse_inside_run
from ..system.children import child_command, child_env, ctrl_c_interrupts, stopped_by_signal
from ..system.paths import fit_name
from .cache import (TMP_MARK, cache_root, file_lock, identity, load_npz_checked, own_cache_inside, path_key,
                    remove_stale_tmp, save_npz_checked, tmp_name, writable_dir)
from .checks import check_fd, open_regular, range_reader
from .request import DataRequest, Ranks

META_VERSION = 4  # 3: unproven members decoded before they are indexed; 4: the shard's identity (inode, ctime)
IMAGE_EXTS = ("jpg", "jpeg", "png")
BAD_HINT = "(--skip-bad-files leaves such samples out and counts them)"
_BRACE = re.compile(r"\{([^{}]*)\}")


# ------------------------------------------------------------------------------------------------ --data forms
MAX_SHARDS = 100_000  # names a brace pattern may expand to (LAION-400M is 41,455 shards of 10,000 samples)
MAX_BRACES = 16  # brace groups in one pattern
_DIGITS = re.compile(r"[0-9]{1,18}")  # a range bound: ASCII digits (str.isdigit also takes '²'), below 2**63


def _brace_items(pattern: str, body: str) -> list[str] | range:
    """The items of one brace group: a zero-padded numeric range {a..b} (as a range of ints) or a list {x,y}."""
    if ".." not in body:
        return body.split(",")
    lo, _, hi = body.partition("..")
    if not (_DIGITS.fullmatch(lo) and _DIGITS.fullmatch(hi)):
        raise FastByolError(f"--data {pattern}: {{{body[:40]}}} is not a numeric range like {{000000..000146}}")
    if int(hi) < int(lo):
        raise FastByolError(f"--data {pattern}: the range {{{body}}} is empty")
    if int(hi) - int(lo) + 1 > MAX_SHARDS:
        raise FastByolError(f"--data {pattern}: {{{body}}} names {int(hi) - int(lo) + 1} shards, more than "
                            f"fastbyol reads (at most {MAX_SHARDS})")
    return range(int(lo), int(hi) + 1)


def expand_braces(pattern: str, limit: int = MAX_SHARDS) -> list[str]:
    """'a-{000..002}.tar' -> ['a-000.tar', 'a-001.tar', 'a-002.tar']; '{x,y}' lists; several braces multiply. More than
    `limit` names is one line (counted as they are made: a pattern that multiplies to 10^8 stops at limit + 1)."""
    out: list[str] = []

    def expand(text: str, depth: int = 0) -> None:
        if depth > MAX_BRACES:
            raise FastByolError(f"--data {pattern[:200]}: more than {MAX_BRACES} brace groups")
        m = _BRACE.search(text)
        if m is None:
            out.append(text)
            if len(out) > limit:
                raise FastByolError(f"--data {pattern}: the pattern names more than {limit} shards (at most {limit})")
            return
        body, head, tail = m.group(1), text[:m.start()], text[m.end():]
        items = _brace_items(pattern, body)
        if isinstance(items, range):
            lo, hi = body.partition("..")[::2]
            width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
            items = (f"{i:0{width}d}" for i in items)
        for item in items:
            expand(head + item + tail, depth + 1)

    expand(pattern)
    return out


def is_shard_spec(spec: str) -> bool:
    """Whether --data names tar shards by its form alone (a brace pattern or a .tar path)."""
    return spec.endswith(".tar") or bool(_BRACE.search(spec))


def shard_paths(spec: str) -> tuple[list[Path], list[Path]]:
    """(pretraining shards, kNN test shards) of a --data value; FastByolError naming a missing shard."""
    if _BRACE.search(spec):
        paths = [Path(p).expanduser() for p in expand_braces(spec)]
        present = [p for p in paths if p.is_file()]
        if not present:
            raise FastByolError(f"--data {spec}: no shard matches ({len(paths)} names, from {paths[0].name}; "
                                f"none exists in {paths[0].parent})")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FastByolError(f"{missing[0]}: missing shard ({len(missing)} of the {len(paths)} in --data {spec})")
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            tars = sorted(p for p in path.glob("*.tar") if p.is_file())
            if not tars:
                raise FastByolError(f"--data {spec}: no .tar shards in the folder")
            train = [p for p in tars if p.name.startswith("train")]
            test = [p for p in tars if p.name.startswith("test")]
            return (train, test) if train else (tars, [])
        if not path.is_file():
            raise FastByolError(f"{path}: missing shard")
        paths = [path]
    test: list[Path] = []
    if all(p.name.startswith("train") for p in paths):
        test = sorted(p for p in paths[0].parent.glob("test*.tar") if p.is_file())
    return paths, test


# ------------------------------------------------------------------------------------------------ the tar index
MAX_NAME_RECORD = 1 << 16  # bytes of a GNU long-name (L) or pax (x) record: names are at most 4 KB on Linux


def _octal(field: bytes) -> int | None:
    """A tar header's number: octal digits (space or NUL padded), or GNU base-256; None when it is neither (a
    damaged header: never an exception from int())."""
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.strip(b"\0 ")
    if digits and not re.fullmatch(rb"[0-7]+", digits):
        return None
    return int(digits, 8) if digits else 0


def tar_members(fd: int, size: int, where: str) -> tuple[list[tuple[str, int, int]], str | None]:
    """([(name, data offset, data size)] of the regular members, problem or None) from the headers alone.

    Handles ustar prefixes, GNU long names (L) and pax path records (x); verifies every header's checksum. A header
    or member that runs past the end stops the walk with the problem "truncated tar ..." (a member cut short is
    listed with offset -1, so its sample is dropped)."""
    out: list[tuple[str, int, int]] = []
    pos, long_name = 0, None
    while True:
        if pos + 512 > size:
            return out, None if pos == size else f"truncated tar (a header at byte {pos} is cut)"
        h = os.pread(fd, 512, pos)
        if h.count(0) == 512:  # end-of-archive block
            return out, None
        stored = _octal(h[148:156])
        if stored != sum(h[:148]) + 256 + sum(h[156:]):
            return out, f"corrupt tar (bad header checksum at byte {pos})"
        msize = _octal(h[124:136])
        if msize is None:
            return out, f"corrupt tar (the size field of the header at byte {pos} is not a number)"
        kind = h[156:157]
        if kind in (b"L", b"x") and msize > MAX_NAME_RECORD:
            return out, f"corrupt tar (a {msize}-byte name record at byte {pos}; names are at most {MAX_NAME_RECORD})"
        data = pos + 512
        if data + msize > size:
            name = (long_name or h[:100].split(b"\0", 1)[0]).decode("utf-8", "surrogateescape")
            out.append((name, -1, msize))  # offset -1: the member that was cut (its sample is dropped)
            return out, f"truncated tar (member {name} at byte {pos} runs past the end of the {size}-byte file)"
        name_b = h[:100].split(b"\0", 1)[0]
        if h[257:262] == b"ustar" and h[345:500].strip(b"\0"):
            name_b = h[345:500].split(b"\0", 1)[0] + b"/" + name_b
        if kind == b"L":
            long_name = os.pread(fd, msize, data).split(b"\0", 1)[0]
        elif kind == b"x":
            for rec in re.finditer(rb"\d+ path=([^\n]*)\n", os.pread(fd, msize, data)):
                long_name = rec.group(1)
        elif kind in (b"0", b"\0", b"7"):
            out.append(((long_name or name_b).decode("utf-8", "surrogateescape"), data, msize))
            long_name = None
        pos = data + (msize + 511) // 512 * 512


CLS_BYTES = 32  # a `cls` member's size at most
CLS_DIGITS = 12  # parse_cls (the DALI graph) reads the first 12 bytes
_CLS = re.compile(rb"([0-9]{1,%d})[ \t\r\n]*" % CLS_DIGITS)  # what parse_cls and int() read alike


def parse_cls_bytes(data: bytes, size: int) -> tuple[int, str | None]:
    """(label, None) of a `cls` member's bytes, or (-1, why not): 1 to 12 ASCII digits, then only ASCII whitespace
    (WebDataset writes "7" or "7\n"), at most CLS_BYTES in all: exactly the forms on which the DALI graph's parse_cls
    and this index agree; and a label below dataset.MAX_CLASSES (the probe and the kNN vote are sized by it)."""
    from .dataset import MAX_CLASSES

    m = _CLS.fullmatch(data) if size <= CLS_BYTES else None
    if m is None:
        return -1, f"not a class index ({data[:16]!r}{'...' if size > 16 else ''}: 1 to {CLS_DIGITS} ASCII digits)"
    label = int(m.group(1))
    if label >= MAX_CLASSES:
        return -1, f"class index {label} is out of range (fastbyol takes 0..{MAX_CLASSES - 1})"
    return label, None


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) as DALI's webdataset reader groups members: up to the first dot of the base name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def index_shard(path: Path) -> dict:
    """Walk and check one shard: {"identity" (cache.identity of the shard when it was opened), "samples": [(key, ext,
    off, size, label, cls_off, cls_size, name, cls_name, gray)], "bad": [[key, reason]], "problem": shard-level problem or None, "unproven":
    [(index into samples, why the header check leaves the image unproven)]}."""
    fd = open_regular(path)
    try:
        st = os.fstat(fd)
        members, problem = tar_members(fd, st.st_size, str(path))
        groups: list[tuple[str, list]] = []
        for name, off, size in members:
            key, ext = _split_name(name)
            base = key[key.rfind("/") + 1:]
            if not base or base.startswith("."):
                continue
            if groups and groups[-1][0] == key:
                groups[-1][1].append((ext, off, size, name))
            else:
                groups.append((key, [(ext, off, size, name)]))
        samples, bad, unproven = [], [], []
        for key, parts in groups:
            if any(off < 0 for _, off, _, _ in parts):  # the sample a truncation cut: counted with the problem
                continue
            comps = {ext.lower(): (ext, off, size, name) for ext, off, size, name in parts}
            image = next((comps[e] for e in IMAGE_EXTS if e in comps), None)
            if image is None:
                bad.append([key, "the sample has no image (jpg, jpeg or png)"])
                continue
            if any(c.isspace() for c in image[3]):
                bad.append([key, "its member name holds whitespace (DALI's index cannot list it)"])
                continue
            info: dict = {}
            why = check_fd(fd, image[2], "." + image[0], base=image[1], info=info)
            if why is not None:
                bad.append([key, f"{image[3]}: {why}"])
                continue
            label, cls_off, cls_size = -1, -1, -1
            if "cls" in comps:
                _, cls_off, cls_size, cls_name = comps["cls"]
                label, why = parse_cls_bytes(os.pread(fd, min(cls_size, CLS_BYTES + 1), cls_off), cls_size)
                if why is None and any(c.isspace() for c in cls_name):
                    why = "its member name holds whitespace (DALI's index cannot list it)"
                if why is not None:
                    bad.append([key, f"{cls_name}: {why}"])
                    continue
            if "unproven" in info:
                unproven.append((len(samples), info["unproven"]))
            samples.append((key, image[0], image[1], image[2], label, cls_off, cls_size, image[3],
                            comps["cls"][3] if "cls" in comps else "", info.get("gray", False)))
        return dict(identity=list(identity(st)), samples=samples, bad=bad, problem=problem, unproven=unproven)
    finally:
        os.close(fd)


def _index_text(samples: list, with_cls: bool) -> bytes:
    """DALI's webdataset index v1.2: "v1.2 N", then per sample "ext offset size name" for each component."""
    lines = [f"v1.2 {len(samples)}"]
    for _key, ext, off, size, label, cls_off, cls_size, name, cls_name, _gray in samples:
        line = f"{ext} {off} {size} {name}"
        if with_cls and label >= 0:
            line += f" cls {cls_off} {cls_size} {cls_name}"
        lines.append(line)
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = tmp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _decode_unproven(shards: list[Path], infos: list[dict]) -> None:
    """The pre-flight decode (unproven.py) of the shards' unproven images, all in one child, each member's bytes read
    at its offset: a member that fails moves from the shard's samples to its bad samples, with DALI's reason (or
    "crashed the image decoder (SIGSEGV)"). No child when every image is proven."""
    todo = [(k, j, why) for k, info in enumerate(infos) for j, why in info["unproven"]]
    if not todo:
        return
    from .unproven import decode_check

    items = [(str(shards[k]), infos[k]["samples"][j][2], infos[k]["samples"][j][3], infos[k]["samples"][j][7])
             for k, j, _ in todo]
    where = str(shards[0]) if len(shards) == 1 else f"{shards[0].parent} ({len(shards)} shards)"
    failed: dict[int, set[int]] = {}
    for (k, j, unproven_why), why in zip(todo, decode_check(where, items)):
        if why is not None:
            sample = infos[k]["samples"][j]
            infos[k]["bad"].append([sample[0], f"{sample[7]}: {why} [pre-flight decode: {unproven_why}]"])
            failed.setdefault(k, set()).add(j)
    for k, drop in failed.items():
        infos[k]["samples"] = [s for j, s in enumerate(infos[k]["samples"]) if j not in drop]


def build_shard_metas(shards: list[Path], folder: Path, threads: int = 1) -> None:
    """Index each shard (`threads` at a time), decode the unproven images of all of them once (_decode_unproven),
    and write folder/<name>.idx (DALI's index of the good samples) and <name>.meta.npz for each."""
    if threads > 1 and len(shards) > 1:
        with ThreadPoolExecutor(min(threads, len(shards))) as ex:
            infos = list(ex.map(index_shard, shards))
    else:
        infos = [index_shard(s) for s in shards]
    _decode_unproven(shards, infos)
    for shard, info in zip(shards, infos):
        _write_meta(shard, folder, info)


def _write_meta(shard: Path, folder: Path, info: dict) -> None:
    samples = info["samples"]
    idx_bytes = _index_text(samples, with_cls=True)
    _write_atomic(folder / index_name(shard, ".idx"), idx_bytes)
    header = dict(version=META_VERSION, shard=str(shard), identity=info["identity"], n=len(samples), bad=info["bad"],
                  problem=info["problem"], idx_size=len(idx_bytes))
    save_npz_checked(folder / index_name(shard, ".meta.npz"), dict(
        header=np.frombuffer(json.dumps(header).encode(), np.uint8), labels=np.array([s[4] for s in samples], np.int64),
        img_off=np.array([s[2] for s in samples], np.int64), img_size=np.array([s[3] for s in samples], np.int64),
        gray=np.array([s[9] for s in samples], np.uint8)))


def index_name(shard: Path, suffix: str) -> str:
    """The name of a shard's index file (`suffix` .idx or .meta.npz) in the index folder: its name and a digest of
    its resolved path (two shards of one name in two folders never share an index), within NAME_MAX."""
    return fit_name(shard.name, f"-{path_key(shard.resolve())[:8]}{suffix}")


def _load_meta(shard: Path, folder: Path) -> dict | None:
    """The shard's cached index, or None when missing, damaged, stale (the shard's identity: size, mtime, inode,
    ctime; the index file's size) or holding numbers the shard cannot (a label beyond MAX_CLASSES, a member past its
    end): a cache is rebuilt, never trusted beyond what it can be checked against."""
    from .dataset import MAX_CLASSES

    try:
        z = load_npz_checked(folder / index_name(shard, ".meta.npz"))
        header = json.loads(z["header"].tobytes())
        meta = dict(header, labels=z["labels"], img_off=z["img_off"], img_size=z["img_size"], gray=z["gray"])
        st = shard.stat()
        n = header["n"]
        if (header["version"] != META_VERSION or header["shard"] != str(shard)
                or header["identity"] != list(identity(st))
                or (folder / index_name(shard, ".idx")).stat().st_size != header["idx_size"]):
            return None
        arrays = [meta["labels"], meta["img_off"], meta["img_size"], meta["gray"]]
        if not isinstance(n, int) or any(a.ndim != 1 or len(a) != n for a in arrays) or any(
                a.dtype.kind not in "iu" for a in arrays):
            return None
        if n and not (meta["labels"].min() >= -1 and meta["labels"].max() < MAX_CLASSES
                      and meta["img_off"].min() >= 0 and meta["img_size"].min() >= 0
                      and (meta["img_off"] + meta["img_size"]).max() <= st.st_size and meta["gray"].max() <= 1):
            return None
        if not (isinstance(header["bad"], list) and all(isinstance(b, list) and len(b) == 2 and all(
                isinstance(x, str) for x in b) for b in header["bad"])
                and (header["problem"] is None or isinstance(header["problem"], str))):
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None


def index_dir(shards: list[Path], cache_dir=None) -> Path:
    """DIR/.fastbyol/shards when this user owns it (or can make it), else the cache folder's shards/<hash of DIR>."""
    parent = shards[0].parent.resolve()
    inside = own_cache_inside(parent, "shards")
    if inside is not None:
        return inside
    outside = cache_root(cache_dir) / "shards" / path_key(parent)
    if not writable_dir(outside):
        raise FastByolError(f"{parent} is read-only and the cache folder {outside} cannot be written: "
                            "set FASTBYOL_CACHE to a writable folder")
    return outside


def _build_missing(shards: list[Path], folder: Path, workers: int, lock_fd: int | None = None) -> None:
    """Index `shards` into `folder`: here, or in `workers` shard-index children (many shards), which hold the
    folder's lock with this process (they inherit `lock_fd`) and die with it."""
    if workers <= 1 or len(shards) < 4:
        build_shard_metas(shards, folder, threads=8)
        return
    parts = [part for part in (shards[i::workers] for i in range(workers)) if part]
    procs: list[subprocess.Popen] = []
    with ctrl_c_interrupts():
        try:
            for part in parts:
                procs.append(subprocess.Popen(child_command("--shards", str(folder)), stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, env=child_env(),
                                              pass_fds=() if lock_fd is None else (lock_fd,)))
            for p, part in zip(procs, parts):
                p.stdin.write("\n".join(str(s) for s in part).encode("utf-8", "surrogateescape"))
                p.stdin.close()
            outs = [p.stdout.read() for p in procs]  # nothing unless a worker fails: its one line
            for p in procs:
                p.wait()
        finally:  # an interrupt: no worker goes on indexing
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for p, out in zip(procs, outs):
        stopped_by_signal(p.returncode, f"{folder}: a shard-index worker")
        if p.returncode != 0:
            lines = out.decode("utf-8", "replace").strip().splitlines()
            raise FastByolError(lines[-1] if p.returncode == 2 and lines
                                else f"{folder}: a shard-index worker failed (exit {p.returncode})")


def obtain_index(shards: list[Path], *, rank: int = 0, world_size: int = 1, barrier=None, cache_dir=None,
                 workers: int | None = None) -> tuple[list[dict], Path, float]:
    """Every shard's meta (built where missing or stale), the index folder, and the seconds spent here."""
    t0 = time.perf_counter()
    shards = [s.resolve() for s in shards]
    folder = index_dir(shards, cache_dir)
    workers = workers or min(8, len(os.sched_getaffinity(0)))

    def locked() -> list[dict]:
        with file_lock(folder / "index.lock") as lock_fd:
            metas = [_load_meta(s, folder) for s in shards]
            stale = [s for s, m in zip(shards, metas) if m is None]
            if stale:
                remove_stale_tmp(folder)
                _build_missing(stale, folder, workers, lock_fd)
                metas = [m if m is not None else _load_meta(s, folder) for s, m in zip(shards, metas)]
            for s, m in zip(shards, metas):
                if m is None:
                    raise FastByolError(f"{s}: its index could not be written in {folder}")
            return metas

    if barrier is not None and world_size > 1:
        if rank == 0:
            metas = locked()
        barrier()
        if rank != 0:
            metas = locked()
    else:
        metas = locked()
    return metas, folder, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ the source
def parse_cls(raw):
    """DALI graph: ASCII digits of a `cls` component (uint8, variable length) -> int64 scalar per sample.

    value = sum over the n leading digits d_i of d_i * 10^(n - 1 - i) (up to 12 digits; trailing bytes ignored)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    width = 12
    x = fn.slice(fn.pad(raw, axes=[0], shape=[width], fill_value=32), 0, width, axes=[0])  # (12,) uint8
    xi = fn.cast(x, dtype=types.INT64)
    digit = fn.cast((xi >= 48) & (xi <= 57), dtype=types.INT64)  # (12,) 1 where an ASCII digit
    n = fn.reductions.sum(digit, axes=[0])  # number of digits (they lead; padding is spaces)
    expo = n - 1 - types.Constant(np.arange(width, dtype=np.int64))  # (12,) power of ten of each position
    weight = fn.cast(dmath.pow(10.0, fn.cast(dmath.max(expo, 0), dtype=types.FLOAT64)), dtype=types.INT64)
    keep = digit * fn.cast(expo >= 0, dtype=types.INT64)
    return fn.reductions.sum((xi - 48) * keep * weight, axes=[0])


class ShardSource:
    """Tar shards for the training pipeline (the encoded-source contract of folders.FileList)."""

    def __init__(self, paths: list[str], index_paths: list[str], count: int, where: str,
                 labels: np.ndarray | None = None, initial_fill: int = 1024):
        self.paths, self.index_paths = paths, index_paths
        self._count = count
        self.where = where
        self.labels = labels  # (N,) int64 in index order when dali_reader should output labels, else None
        self.labelled = labels is not None  # every sample has a `cls` (load_shards sets it for labelled shards)
        self.initial_fill = initial_fill
        self.skip_bad = False  # the training pipeline may stand another sample in for one it cannot decode
        self.source_index = list(index_paths)  # the shared indexes; index_paths[k] becomes this process's own copy
        self.bad: list[str] = []  # samples replaced so far, as failed_sample names them (shard.tar:offset:member)

    def __len__(self) -> int:
        return self._count

    def replace_bad(self, *names: str) -> bool:
        """Stand the nearest earlier good sample of the same shard (the next one for its first) in for each of
        `names` (`shard.tar:offset:member`, as DALI names a sample it cannot decode), in this process's own copy of
        that shard's index: same sample count and order, so positions and DALI's checkpoint stay valid; the shared
        index is never written. False (nothing changed) if a name is not a sample of these shards, or a shard would
        have no good sample left."""
        from .cache import own_file
        from .folders import stand_ins

        new = [n for n in names if n not in self.bad]
        plan: dict[int, list[str]] = {}
        for name in new:
            path, off = _shard_and_offset(name)
            if path not in self.paths or not off.isdigit():
                return False
            plan.setdefault(self.paths.index(path), []).append(off)
        writes = {}
        for k in plan:
            offs = {off for path, off in map(_shard_and_offset, self.bad + new) if path == self.paths[k]}
            with open(self.source_index[k], "rb") as f:
                header, *lines = f.read().decode("utf-8", "surrogateescape").splitlines()
            found = {ln.split()[1] for ln in lines} & set(plan[k])
            pick = stand_ins([ln.split()[1] in offs for ln in lines])
            if len(found) != len(set(plan[k])) or pick is None:
                return False
            writes[k] = "\n".join([header] + [lines[j] for j in pick]) + "\n"
        for k, text in writes.items():
            own = self.index_paths[k] if self.index_paths[k] != self.source_index[k] else own_file(self, ".idx")
            with open(own, "wb") as f:
                f.write(text.encode("utf-8", "surrogateescape"))
            self.index_paths[k] = own
        self.bad += new
        return True

    def dali_reader(self, shard_id: int, num_shards: int, name: str = "reader"):
        """(encoded bytes, int64 label node or None): this rank's part, through a shuffle buffer; the label node
        where `labels` is set."""
        encoded, raw = self.dali_read(shard_id, num_shards, name, labels=self.labels is not None)
        return encoded, (None if raw is None else self.dali_label(raw))

    def dali_read(self, shard_id: int, num_shards: int, name: str = "reader", labels: bool = False):
        """(encoded bytes, each sample's raw `cls` bytes where `labels` and the shards are `labelled`, else None): the
        reader alone. With labels it also reads the `cls` component (the same samples in the same order:
        tests/test_online_probe_files.py)."""
        from nvidia.dali import fn

        want = labels and self.labelled
        ext = ["jpg;jpeg;png"] + (["cls"] if want else [])
        fill = max(1, min(self.initial_fill, self._count // max(num_shards, 1)))
        out = fn.readers.webdataset(paths=self.paths, index_paths=self.index_paths, ext=ext,
                                    case_sensitive_extensions=False, missing_component_behavior="error",
                                    shard_id=shard_id, num_shards=num_shards, random_shuffle=True, initial_fill=fill,
                                    name=name)
        if not want:
            return (out[0] if isinstance(out, (list, tuple)) else out), None
        return out[0], out[1]

    @staticmethod
    def dali_label(raw):
        return parse_cls(raw)


def _shard_and_offset(name: str) -> tuple[str, str]:
    """(shard path, member offset) of DALI's `shard.tar:offset:member` sample name."""
    parts = name.split(":")
    return ":".join(parts[:-2]), (parts[-2] if len(parts) >= 3 else "")


def _shard_item(path: str, off: int, size: int, key: str):
    return f"{path}:{key}", range_reader(path, off, size)


def _collect(shards: list[Path], metas: list[dict], skip_bad: bool) -> tuple[int, int]:
    """(good samples, bad samples); FastByolError naming the first bad one unless skip_bad."""
    n_bad = 0
    for s, m in zip(shards, metas):
        if m["problem"] is not None and not skip_bad:
            raise FastByolError(f"{s}: {m['problem']} {BAD_HINT}")
        if m["bad"] and not skip_bad:
            key, why = m["bad"][0]
            raise FastByolError(f"{s}: sample {key}: {why} {BAD_HINT}")
        n_bad += len(m["bad"]) + (m["problem"] is not None)
        if m["n"] == 0 and not skip_bad:
            raise FastByolError(f"{s}: the shard holds no samples")
    return sum(m["n"] for m in metas), n_bad


def load_shards(spec: str, request: DataRequest, ranks: Ranks | None = None, *, with_labels: bool = False):
    """An ImageDataset whose pretraining source is a ShardSource; kNN from labeled train/test shards.

    ranks: who builds the index (obtain_index; default rank 0 of 1). From the request: skip_bad_files, and the kNN
    images (decoded here when it decodes_eval_images(ranks), at its image_size, at most max_eval_images of each
    split, a sample seeded by its seed). with_labels: the source's `labels` are the train shards' classes (where
    every sample has one)."""
    from .dataset import ImageDataset, PendingSplits, Startup
    from .decode import BackgroundDecode, decode_splits

    ranks = Ranks() if ranks is None else ranks
    skip_bad_files, max_eval_images = request.skip_bad_files, request.max_eval_images
    train, test = shard_paths(spec)
    metas, folder, seconds = obtain_index(train + test, rank=ranks.rank, world_size=ranks.world_size,
                                          barrier=ranks.barrier, cache_dir=request.cache_dir)
    train_m, test_m = metas[:len(train)], metas[len(train):]
    n_train, bad_train = _collect(train, train_m, skip_bad_files)
    n_test, bad_test = _collect(test, test_m, skip_bad_files) if test else (0, 0)
    if n_train == 0:
        raise FastByolError(f"--data {spec}: the shards hold no usable samples")
    train_labels = np.concatenate([m["labels"] for m in train_m])
    labeled = bool(len(train_labels)) and bool((train_labels >= 0).all())
    resolved = [s.resolve() for s in train]
    source = ShardSource([str(s) for s in resolved], [str(folder / index_name(s, ".idx")) for s in resolved],
                         n_train, spec, labels=train_labels if (with_labels and labeled) else None)
    source.labelled = labeled  # the reader can emit every sample's label (the online probe asks for it)
    source.skip_bad = skip_bad_files
    num_classes = 0
    rng = np.random.default_rng(request.seed)

    def pick(shards: list[Path], ms: list[dict], limit: int, labeled_only: bool):
        labels = np.concatenate([m["labels"] for m in ms])
        owner = np.concatenate([np.full(m["n"], k) for k, m in enumerate(ms)])
        local = np.concatenate([np.arange(m["n"]) for m in ms])
        idx = np.flatnonzero(labels >= 0) if labeled_only else np.arange(len(labels))
        if len(idx) > limit:
            idx = idx[np.sort(rng.choice(len(idx), limit, replace=False))]
        items = [_shard_item(str(shards[owner[i]].resolve()), int(ms[owner[i]]["img_off"][local[i]]),
                             int(ms[owner[i]]["img_size"][local[i]]), str(local[i])) for i in idx]
        return items, labels[idx]

    has_knn = bool(test) and n_test > 0 and bool((train_labels >= 0).any())
    if has_knn:
        test_labels_all = np.concatenate([m["labels"] for m in test_m])
        num_classes = int(max(train_labels.max(), test_labels_all.max())) + 1
        train_items, train_y = pick(train, train_m, max_eval_images, True)
        test_items, test_y = pick(test, test_m, max_eval_images, True)
    else:
        train_items, train_y = pick(train, train_m, 64, False)
        test_items, test_y, train_y = None, None, None

    def job(cancel):
        return decode_splits(train_items, train_y, test_items, test_y, request.image_size, request.decode_threads,
                             skip_bad_files, cancel)

    pending = BackgroundDecode(job, request.background) if request.decodes_eval_images(ranks) else None
    name = train[0].parent.name or "shards"
    return ImageDataset(name, PendingSplits(pending, request.image_size, (n_train, n_test), has_knn), num_classes,
                        f"{len(train)} tar shards ({spec})", pretraining=source,
                        gray=all(bool(m["gray"].all()) for m in train_m),
                        startup=Startup(bad_train + bad_test, dict(listing=0.0, checks=0.0, index=seconds)))


# ------------------------------------------------------------------------------------------------ fastbyol shards
def add_shards_command(subparsers) -> argparse.ArgumentParser:
    """`fastbyol shards SRC DST`: the subcommand's parser."""
    from ..cli.arguments import integer, number
    from ..cli.help import DefaultsHelpFormatter

    p = subparsers.add_parser("shards", help="write WebDataset tar shards from an image folder",
                              formatter_class=DefaultsHelpFormatter,
                              description="Convert an image folder (labeled train/<class>/, test/<class>/, "
                                          "unlabeled/, or a plain folder) into tar shards DST/train-NNNNNN.tar "
                                          "(and test-NNNNNN.tar): jpg/png + cls, samples in a seeded random order.")
    p.add_argument("src", help="image folder (read through its manifest)")
    p.add_argument("dst", help="output folder (created; must hold no .tar files)")
    p.add_argument("--max-samples", type=integer, default=10000, help="samples per shard at most")
    p.add_argument("--max-bytes", type=number, default=1e9, help="bytes per shard at most (one sample may exceed)")
    p.add_argument("--seed", type=integer, default=0, help="seed of the sample order")
    p.add_argument("--skip-bad-files", action="store_true", help="leave bad images out (counted) instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(src: Path, dst: Path, max_samples: int = 10000, max_bytes: float = 1e9, seed: int = 0,
                 skip_bad_files: bool = False, progress: bool = True) -> dict:
    """Write the folder's images into tar shards; {"train": shards, "test": shards, "samples", "bytes", "skipped"}.

    All shards are written into a temporary folder inside dst and moved into place at the end: a failure or an
    interrupt leaves dst as it was. dst is locked meanwhile (fastbyol.run.disk.FolderLock): a second command
    writing there is refused in one line, and dst is never a run's folder."""
    if max_samples < 1 or not max_bytes > 0:
        raise FastByolError("--max-samples and --max-bytes must be positive")
    if not src.is_dir():
        raise FastByolError(f"{src}: not a folder (shards are written from an image folder)")
    real_src, real_dst = src.resolve(), dst.resolve()  # symlinks followed: a link into SRC is inside it too
    if real_dst == real_src or real_src in real_dst.parents:
        raise FastByolError(f"{dst}: inside the source folder {src} (the shards would be written into the dataset); "
                            "choose a folder outside it")
    refuse_inside_run(dst)
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastByolError(f"{dst}: cannot create it ({e.strerror})") from None
    with FolderLock(dst, "in use by another fastbyol shards command (pid {pid}); wait for it, or choose another "
                         "folder"):
        if any(dst.glob("*.tar")):  # looked at under the lock: a command that just finished is seen
            raise FastByolError(f"{dst}: already holds .tar files; choose an empty folder")
        return _write_locked(src, dst, max_samples, max_bytes, seed, skip_bad_files, progress)


def _write_locked(src: Path, dst: Path, max_samples: int, max_bytes: float, seed: int, skip_bad_files: bool,
                  progress: bool) -> dict:
    """write_shards' work, dst's lock held."""
    from . import manifest as mf

    man, _, _ = mf.obtain(src)
    if man.bad and not skip_bad_files:
        rel, why = man.bad[0][0], man.bad[0][1]
        raise FastByolError(f"{man.root / rel}: {why} (--skip-bad-files leaves such files out and counts them)")
    rng = np.random.default_rng(seed)
    plan = {"train": np.flatnonzero(man.split != mf.TEST), "test": man.indices(mf.TEST)}
    total = sum(len(v) for v in plan.values())
    if len(plan["train"]) == 0:
        raise FastByolError(f"{src}: no images to write")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="shards", file=sys.stderr, dynamic_ncols=True)
    remove_stale_tmp(dst)
    tmp = dst / f".partial{TMP_MARK}{os.getpid()}"
    tmp.mkdir()
    written = {"train": [], "test": [], "samples": 0, "bytes": 0, "skipped": len(man.bad)}
    try:
        for split, idx in plan.items():
            idx = idx[rng.permutation(len(idx))]
            shard, tar, count, size = -1, None, 0, 0
            for i in idx.tolist():
                rel = man.path(i)
                data = (man.root / rel).read_bytes()
                if tar is None or count >= max_samples or size + len(data) > max_bytes and count:
                    if tar is not None:
                        tar.close()
                    shard += 1
                    name = f"{split}-{shard:06d}.tar"
                    tar = tarfile.open(tmp / name, "w", format=tarfile.USTAR_FORMAT)
                    written[split].append(name)
                    count, size = 0, 0
                ext = "png" if rel.lower().endswith(".png") else "jpg"
                key = f"{written['samples']:09d}"
                _tar_add(tar, f"{key}.{ext}", data)
                if man.labels[i] >= 0:
                    _tar_add(tar, f"{key}.cls", str(int(man.labels[i])).encode())
                count, size = count + 1, size + len(data)
                written["samples"] += 1
                written["bytes"] += len(data)
                if bar is not None:
                    bar.update(1)
            if tar is not None:
                tar.close()
        if man.classes:
            (tmp / "classes.txt").write_text("".join(f"{k} {c}\n" for k, c in enumerate(man.classes)))
        for name in written["train"] + written["test"] + (["classes.txt"] if man.classes else []):
            os.replace(tmp / name, dst / name)
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def run_shards(args) -> int:
    """`fastbyol shards SRC DST`: convert, print what was written and the --data value to use; 0."""
    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    w = write_shards(src, dst, args.max_samples, args.max_bytes, args.seed, args.skip_bad_files,
                     progress=not args.no_progress)
    n_train, n_test = len(w["train"]), len(w["test"])
    pattern = f"{dst}/train-{{000000..{n_train - 1:06d}}}.tar" if n_train > 1 else f"{dst}/train-000000.tar"
    skipped = f", {w['skipped']} bad files skipped" if w["skipped"] else ""
    print(f"wrote {n_train} train + {n_test} test shards ({w['samples']} samples, {w['bytes'] / 1e6:.1f} MB"
          f"{skipped}) to {dst}: --data '{pattern}' (or --data {dst})")
    return 0
