"""The pre-flight decode (fastbyol/data/unproven.py): files the header check passes but cannot prove safe are decoded
once, before step 1, in a child process; a crash there names the file; proven files never pay for it.

The unproven files here are JPEGs without Huffman table segments (the decoder's default tables): one written with
the standard tables decodes; one written with optimized tables decodes to garbage with a libjpeg warning (a genuine
decoder failure). A decoder crash is stood in for by FASTBYOL_TEST_DECODE_CRASH (the child SIGSEGVs itself).
"""

import io
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")

from PIL import Image  # noqa: E402

from fastbyol.data import DataRequest, resolve_dataset  # noqa: E402
from fastbyol.data import unproven  # noqa: E402
from fastbyol.data.checks import check_bytes  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402

from .support import good_jpegs  # noqa: E402


def without_huffman_tables(optimize: bool, seed: int = 0) -> bytes:
    """A 40 px JPEG with its DHT segments removed."""
    rng = np.random.default_rng(seed)
    b = io.BytesIO()
    Image.fromarray((rng.integers(0, 256, (40, 40, 3)) // 64 * 64).astype(np.uint8)).save(
        b, "JPEG", optimize=optimize, quality=90)
    data, out, pos = b.getvalue(), bytearray(b"\xff\xd8"), 2
    while data[pos + 1] != 0xDA:
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if data[pos + 1] != 0xC4:
            out += data[pos:pos + 2 + length]
        pos += 2 + length
    return bytes(out + data[pos:])


def _info(data: bytes) -> dict:
    info: dict = {}
    from fastbyol.data.checks import check_encoded

    assert check_encoded(lambda o, n: data[o:o + n], len(data), ".jpg", info) is None
    return info


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    return good_jpegs(tmp_path_factory, 24)


def _folder(good_files, root, extra: dict[str, bytes]):
    (root / "all").mkdir(parents=True)
    for p in good_files:
        shutil.copy(p, root / "all" / p.name)
    for name, data in extra.items():
        (root / "all" / name).write_bytes(data)
    return root


def _no_child(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a pre-flight decode child was started")

    monkeypatch.setattr(unproven, "_child", refuse)


def test_which_files_are_unproven():
    ordinary = _jpeg_bytes()
    assert "unproven" not in _info(ordinary)
    assert "Huffman" in _info(without_huffman_tables(False))["unproven"]
    big = bytearray(ordinary)  # the same file, its frame header saying 9000 x 9000 (81 MP)
    sof = big.find(b"\xff\xc0")
    big[sof + 5:sof + 9] = struct.pack(">HH", 9000, 9000)
    assert _info(bytes(big))["unproven"] == "9000x9000 pixels"
    big[sof + 5:sof + 9] = struct.pack(">HH", 8000, 8000)  # 64 MP: within the bound
    assert "unproven" not in _info(bytes(big))


def _jpeg_bytes() -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(b, "JPEG")
    return b.getvalue()


def test_a_folder_of_proven_files_starts_no_child(good_files, tmp_path, monkeypatch):
    _no_child(monkeypatch)
    folder = _folder(good_files, tmp_path / "imgs", {})
    ds = resolve_dataset(str(folder), DataRequest(image_size=16, eval_images=False))
    assert ds.skipped_files == 0 and not (folder / ".fastbyol" / unproven.DECODED).exists()


def test_an_unproven_file_that_decodes_is_kept_and_never_decoded_again(good_files, tmp_path, monkeypatch):
    folder = _folder(good_files, tmp_path / "imgs", {"zz-default-tables.jpg": without_huffman_tables(False)})
    calls = []
    real = unproven._child
    monkeypatch.setattr(unproven, "_child", lambda where, items: calls.append([it[3] for it in items])
                        or real(where, items))
    ds = resolve_dataset(str(folder), DataRequest(image_size=16, eval_images=False))
    assert ds.skipped_files == 0 and len(ds.pretraining_source) == 25 and calls == [["all/zz-default-tables.jpg"]]
    _no_child(monkeypatch)
    resolve_dataset(str(folder), DataRequest(image_size=16, eval_images=False))  # the manifest is fresh
    (folder / "all" / "new.jpg").write_bytes(good_files[0].read_bytes())  # a rescan: decoded.json answers
    assert len(resolve_dataset(str(folder), DataRequest(image_size=16, eval_images=False)).pretraining_source) == 26


def test_an_unproven_file_the_decoder_refuses_is_a_bad_file(good_files, tmp_path):
    bad = without_huffman_tables(True)
    assert check_bytes(bad, ".jpg") is None  # the header check passes it
    folder = _folder(good_files, tmp_path / "imgs", {"zz-garbled.jpg": bad})
    with pytest.raises(FastByolError, match=r"zz-garbled\.jpg: DALI cannot decode it .*Corrupt JPEG data.*"
                                            r"\[pre-flight decode: no Huffman tables"):
        resolve_dataset(str(folder), DataRequest(image_size=16, eval_images=False))
    ds = resolve_dataset(str(folder), DataRequest(image_size=16, skip_bad_files=True, eval_images=False))
    assert ds.skipped_files == 1 and len(ds.pretraining_source) == 24


def crashed_run(data, crash: str, out) -> str:
    """`fastbyol train --data DATA` with the decoder crash hook on `crash`: exit 2, no traceback, no run folder left;
    the last stderr line."""
    env = {**os.environ, unproven.CRASH_ENV: crash, "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "fastbyol", "train", "--data", str(data), "--epochs", "1", "--batch-size", "8",
           "--image-size", "16", "--no-progress", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr and not out.exists(), res.stderr[-3000:]
    return [ln for ln in res.stderr.splitlines() if ln.strip()][-1]


def test_a_decoder_crash_names_the_file_and_is_skipped_as_a_bad_file(good_files, tmp_path, monkeypatch):
    """14 unproven files (more than one batch of the child); the 13th crashes it: found among its batch, one by one."""
    extra = {f"u{k:02d}.jpg": without_huffman_tables(False, seed=k) for k in range(14)}
    folder = _folder(good_files, tmp_path / "imgs", extra)
    assert crashed_run(folder, "u12.jpg", tmp_path / "run").startswith(
        f"fastbyol: error: {folder / 'all' / 'u12.jpg'}: crashed the image decoder (SIGSEGV) [pre-flight decode: "
        "no Huffman tables")
    monkeypatch.setenv(unproven.CRASH_ENV, "u12.jpg")
    _no_child(monkeypatch)  # the manifest holds the result: nothing decoded again
    ds = resolve_dataset(str(folder), DataRequest(image_size=16, skip_bad_files=True, eval_images=False))
    assert ds.skipped_files == 1 and len(ds.pretraining_source) == 24 + 13


@pytest.mark.parametrize("value,name", [("u1.jpg", "u1.jpg"), ("", None), ("a/u1.jpg", None), ("..", None)])
def test_the_crash_hook_takes_a_plain_file_name_only(monkeypatch, value, name):
    monkeypatch.setenv(unproven.CRASH_ENV, value)
    assert unproven.crash_name() == name
