"""Numbers read from data files are bounded before they size anything, and text in them is parsed by exactly its
documented form: a shard's `cls` label, a tar header's size and name records, an idx header behind gzip, an .npz
member's declared shape, an image file's size, and the caches (a shard's meta, a folder's manifest) that hold such
numbers. Each bad one is one line naming the file (and member), or a cache rebuilt; never a traceback or an
allocation sized by the file."""

import gzip
import io
import json
import os
import struct
import tarfile
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")

from fastbyol.cli import main  # noqa: E402
from fastbyol.data import DataRequest, resolve_dataset  # noqa: E402
from fastbyol.data import manifest as mf  # noqa: E402
from fastbyol.data.cache import load_npz_checked, save_npz_checked  # noqa: E402
from fastbyol.data.dataset import MAX_CLASSES  # noqa: E402
from fastbyol.data.idx import read_idx  # noqa: E402
from fastbyol.data.readers import load_numpy  # noqa: E402
from fastbyol.data.shards import (CLS_DIGITS, MAX_NAME_RECORD, index_dir, index_name, load_shards,  # noqa: E402
                                  parse_cls, parse_cls_bytes, tar_members)
from fastbyol.data.synthetic import write_synthetic_jpegs  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402

from .support import one_line  # noqa: E402


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = write_synthetic_jpegs(tmp_path_factory.mktemp("src"), n_train=8, n_test=0, size=32, classes=1)
    return [p.read_bytes() for p in sorted((root / "train").rglob("*.jpg"))]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))


def _tar(path, members, fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _shard(tmp_path, jpegs, cls_of_third: bytes, name="train-000000.tar"):
    members = []
    for i, jpg in enumerate(jpegs):
        members += [(f"s{i:03d}.jpg", jpg), (f"s{i:03d}.cls", cls_of_third if i == 3 else str(i % 2).encode())]
    (tmp_path / "wds").mkdir(exist_ok=True)
    return _tar(tmp_path / "wds" / name, members)


@pytest.mark.parametrize("cls, why", [
    (b"999999999999", "class index 999999999999 is out of range"),  # the hostile round's: a 10^12-class probe
    (str(MAX_CLASSES).encode(), f"class index {MAX_CLASSES} is out of range"),
    (b"1234567890123", "not a class index"),  # 13 digits: DALI's parse_cls reads 12
    ("²".encode(), "not a class index"),  # a digit to str.isdigit, not to int() nor to DALI
    (b" 5", "not a class index"),  # int() reads 5, DALI's parse_cls 0: no form on which the two disagree
    (b"5 3", "not a class index"),
    (b"-1", "not a class index"),
    (b"7" * 40, "not a class index"),
])
def test_a_cls_member_out_of_form_or_range_is_one_line_naming_shard_and_member(tmp_path, jpegs, cls, why):
    shard = _shard(tmp_path, jpegs, cls)
    with pytest.raises(FastByolError) as e:
        load_shards(str(shard), DataRequest(image_size=32, eval_images=False))
    line = str(e.value)
    assert "\n" not in line and str(shard) in line and "s003.cls" in line and why in line, line
    ds = load_shards(str(shard), DataRequest(image_size=32, skip_bad_files=True, eval_images=False))  # left out
    assert len(ds.pretraining_source) == 7 and ds.skipped_files == 1


def test_the_train_command_refuses_a_huge_class_index_in_one_line(tmp_path, jpegs, capsys):
    shard = _shard(tmp_path, jpegs, b"999999999999")
    assert main(["train", "--data", str(shard), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size",
                 "4", "--image-size", "16", "--no-progress"]) == 2
    one_line(capsys, "s003.cls", "out of range")
    assert not (tmp_path / "run").exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(min_size=0, max_size=20) | st.from_regex(rb"\A[0-9]{1,14}[ \t\r\n]{0,6}\Z"),
                min_size=1, max_size=24))
def test_the_index_and_dalis_parser_agree_on_every_cls_the_index_accepts(texts):
    """parse_cls_bytes accepts exactly the forms on which the DALI graph's parse_cls reads the same label."""
    from nvidia.dali import fn, pipeline_def, types

    accepted = [(t, parse_cls_bytes(t, len(t))[0]) for t in texts if parse_cls_bytes(t, len(t))[1] is None]
    for t in texts:
        label, why = parse_cls_bytes(t, len(t))
        assert (label >= 0) == (why is None) and (why is None or "\n" not in why)
    if not accepted:
        return

    @pipeline_def
    def pipe():
        raw = fn.external_source(source=lambda: [np.frombuffer(t, np.uint8) for t, _ in accepted], batch=True,
                                 dtype=types.UINT8)
        return parse_cls(raw)

    p = pipe(batch_size=len(accepted), num_threads=1, device_id=None)
    p.build()
    (out,) = p.run()
    assert [int(np.array(out[i])) for i in range(len(accepted))] == [label for _, label in accepted]
    assert all(len(t.strip()) <= CLS_DIGITS for t, _ in accepted)


def _raw_header(name: bytes, size_field: bytes, kind: bytes = b"0") -> bytes:
    h = bytearray(512)
    h[:len(name)] = name
    h[100:108] = b"0000644\0"
    h[124:136] = size_field
    h[156:157] = kind
    h[257:263] = b"ustar\0"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % (sum(h))
    return bytes(h)


@pytest.mark.parametrize("size_field, kind, why", [
    (b"0000000009\0\0", b"0", "is not a number"),  # 9 is no octal digit: int(..., 8) raised here once
    (b"00000000x12\0", b"0", "is not a number"),
    (b"%011o\0" % (MAX_NAME_RECORD + 1), b"L", "name record"),  # a GNU long name of 64 KB + 1
    (b"%011o\0" % (MAX_NAME_RECORD + 1), b"x", "name record"),  # a pax record as long
])
def test_a_damaged_tar_header_is_a_problem_not_a_traceback(tmp_path, size_field, kind, why):
    path = tmp_path / "t.tar"
    body = b"\0" * (MAX_NAME_RECORD + 1024)
    path.write_bytes(_raw_header(b"a.jpg", size_field, kind) + body + b"\0" * 1024)
    fd = os.open(path, os.O_RDONLY)
    try:
        members, problem = tar_members(fd, path.stat().st_size, str(path))
    finally:
        os.close(fd)
    assert members == [] and problem is not None and why in problem


def test_idx_headers_are_bounded_before_they_are_read(tmp_path):
    huge = tmp_path / "train-images-idx3-ubyte.gz"  # a gzip bomb's header: 2^32-1 images of 2^16 x 2^16
    huge.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 2**16, 2**16) + b"\0" * 64))
    with pytest.raises(FastByolError, match="more than half of this machine's memory"):
        read_idx(huge)
    longer = tmp_path / "longer-idx1-ubyte.gz"  # declares 4 bytes, holds 4 MB: never read past its header
    longer.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 4) + b"\0" * (4 << 20)))
    with pytest.raises(FastByolError, match="more than 4 data bytes"):
        read_idx(longer)
    plain = tmp_path / "plain-idx1-ubyte"
    plain.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10**9) + b"\0" * 16)
    with pytest.raises(FastByolError, match="holds 16 data bytes"):
        read_idx(plain)


def test_an_npz_member_is_bounded_by_what_it_holds(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10**11, 4, 4, 3)})
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", header.getvalue() + b"\0" * (1 << 20))
    with pytest.raises(FastByolError, match="member 'images' declares"):
        load_numpy(bomb)


def test_an_image_file_larger_than_any_image_is_refused_unread(tmp_path, jpegs):
    root = tmp_path / "data" / "train" / "a"
    root.mkdir(parents=True)
    for i, jpg in enumerate(jpegs):
        (root / f"{i}.jpg").write_bytes(jpg)
    with open(root / "huge.jpg", "wb") as f:  # sparse: 1 GiB + 1 of holes after a JPEG's header
        f.write(jpegs[0][:64])
        f.truncate((1 << 30) + 1)
    with pytest.raises(FastByolError, match="huge.jpg: 1073741825 bytes: larger than any image"):
        resolve_dataset(str(tmp_path / "data"), DataRequest(eval_images=False))


def test_a_shard_meta_holding_numbers_its_shard_cannot_is_rebuilt(tmp_path, jpegs):
    shard = _shard(tmp_path, jpegs, b"3")
    load_shards(str(shard), DataRequest(image_size=32, eval_images=False))
    folder = index_dir([shard])
    meta = folder / index_name(shard, ".meta.npz")
    original = load_npz_checked(meta)
    for field, value in (("labels", 10**12), ("img_off", shard.stat().st_size), ("img_size", -5)):
        arrays = load_npz_checked(meta)
        arrays[field] = arrays[field].copy()
        arrays[field][3] = value
        save_npz_checked(meta, arrays)  # a consistent CRC: only the numbers say it is wrong
        ds = load_shards(str(shard), DataRequest(image_size=32, eval_images=False), with_labels=True)
        assert ds.pretraining_source.labels.tolist() == [0, 1, 0, 3, 0, 1, 0, 1]
        assert np.array_equal(load_npz_checked(meta)[field], original[field])  # rebuilt


def test_a_manifest_holding_what_no_scan_writes_is_rebuilt(tmp_path, jpegs):
    root = tmp_path / "data"
    for k in range(2):
        (root / "train" / f"c{k}").mkdir(parents=True)
        for i, jpg in enumerate(jpegs[:4]):
            (root / "train" / f"c{k}" / f"{i}.jpg").write_bytes(jpg)
    man, _, status = mf.obtain(root)
    assert status == "built"
    folder = man.location
    for field, change in (("paths", lambda a: np.frombuffer(b"../../etc/passwd".ljust(len(a), b"x")[:len(a)],
                                                            np.uint8)),
                          ("labels", lambda a: np.where(np.arange(len(a)) == 0, 10**6, a).astype(a.dtype)),
                          ("split", lambda a: np.full_like(a, 7))):
        arrays = load_npz_checked(folder / mf.MANIFEST_NAME)
        arrays[field] = change(arrays[field])
        save_npz_checked(folder / mf.MANIFEST_NAME, arrays)
        with pytest.raises(ValueError):
            mf.Manifest.load(folder)
        man, _, status = mf.obtain(root)
        assert status.startswith("rebuilt") and man.path(0) == "train/c0/0.jpg"
    header = json.loads(load_npz_checked(folder / mf.MANIFEST_NAME)["header"].tobytes())
    assert header["n"] == 8
