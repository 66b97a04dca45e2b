"""Hostile data inputs: image headers outside what the decoders read, non-regular files,
labels outside the class count, malformed .npz members, shards written into their source. Each ends in one
FastByolError line naming the file (or a correct load), never a hang, a traceback or a native crash."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from fastbyol.data import resolve_dataset
from fastbyol.data.checks import check_bytes, check_image_file
from fastbyol.data.readers import load_cifar, load_numpy
from fastbyol.errors import FastByolError

CORPUS = Path(__file__).parent / "corpus"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width=4, height=4, depth=8, colour=2, method=0, filt=0, interlace=0, plte=None) -> bytes:
    """A PNG with valid chunks and CRCs whose IHDR says exactly what is asked (the pixel data is 8-bit RGB rows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, method, filt, interlace)
    raw = b"".join(b"\x00" + bytes(3 * min(width, 4)) for _ in range(min(height, 4)))  # data need not match
    body = _chunk(b"IHDR", ihdr) + (_chunk(b"PLTE", plte) if plte else b"")
    return b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def jpeg(sof=0xC0, precision=8, ncomp=3, hv=0x11) -> bytes:
    """A minimal JPEG header walk: DQT, SOF, DHT (DC and AC table 0), SOS, a few data bytes, EOI."""
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes([1] * 64)
    comps = b"".join(bytes([c + 1, hv, 0]) for c in range(ncomp))
    sofseg = bytes([0xFF, sof]) + struct.pack(">HBHHB", 8 + 3 * ncomp, precision, 8, 8, ncomp) + comps
    table = bytes([1] + [0] * 15) + b"\x00"
    dht = b"\xff\xc4" + struct.pack(">H", 2 + 2 * 18) + b"\x00" + table + b"\x10" + table
    sos = b"\xff\xda" + struct.pack(">HB", 6 + 2 * ncomp, ncomp) + b"".join(bytes([c + 1, 0]) for c in range(ncomp)) \
        + b"\x00\x3f\x00"
    return b"\xff\xd8" + dqt + sofseg + dht + sos + bytes(64) + b"\xff\xd9"


def test_good_headers_pass():
    assert check_bytes(png(), ".png") is None
    assert check_bytes(png(depth=16, colour=6), ".png") is None
    assert check_bytes(png(depth=1, colour=0), ".png") is None
    assert check_bytes(png(depth=8, colour=3, plte=bytes(3 * 4)), ".png") is None
    assert check_bytes(png(interlace=1), ".png") is None
    for sof in (0xC0, 0xC1, 0xC2):
        assert check_bytes(jpeg(sof=sof), ".jpg") is None
    assert check_bytes(jpeg(ncomp=1), ".jpg") is None


ALLOWED = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}


@pytest.mark.parametrize("colour", [0, 1, 2, 3, 4, 5, 6, 7])
def test_png_colour_depth_pairs(colour):
    """Every pair the PNG specification does not allow is refused (colour 6 with depth 1 crashed DALI)."""
    for depth in (0, 1, 2, 3, 4, 8, 16, 32):
        why = check_bytes(png(depth=depth, colour=colour, plte=bytes(12) if colour == 3 else None), ".png")
        if depth in ALLOWED.get(colour, ()):
            assert why is None, (colour, depth, why)
        else:
            assert why is not None and "bit depth" in why, (colour, depth)


@pytest.mark.parametrize("field", [dict(method=1), dict(filt=1), dict(interlace=2), dict(width=0),
                                   dict(width=1 << 20), dict(height=1 << 31)])
def test_png_other_header_fields(field):
    assert "corrupt PNG (header" in check_bytes(png(**field), ".png")


def test_png_palette_needs_plte():
    assert "PLTE" in check_bytes(png(depth=8, colour=3), ".png")


@pytest.mark.parametrize("sof", [0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF])
def test_jpeg_frame_types_refused(sof):
    """Arithmetic (decoded to garbage and trained with skipped_files 0), lossless and hierarchical frames."""
    assert f"frame type FF {sof:02X}" in check_bytes(jpeg(sof=sof), ".jpg")


@pytest.mark.parametrize("kw", [dict(precision=12), dict(precision=16), dict(ncomp=2), dict(ncomp=4),
                                dict(hv=0x51), dict(hv=0x10)])
def test_jpeg_frame_fields_refused(kw):
    assert check_bytes(jpeg(**kw), ".jpg") is not None


def test_corpus_replayed():
    """Every file of tests/corpus (inputs that crashed or misled the decoders) is refused by the check."""
    files = sorted(CORPUS.glob("*.png")) + sorted(CORPUS.glob("*.jpg"))
    assert len(files) >= 3
    for f in files:
        assert check_image_file(f) is not None, f.name


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_fifo_in_image_folder_does_not_block(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(png())
    os.mkfifo(root / "pipe.png")
    out = _run(f"from fastbyol.data import DataRequest\nfrom fastbyol.data.folders import load_image_folder\n"
               f"from fastbyol.errors import FastByolError\n"
               f"try:\n    load_image_folder({str(root)!r}, DataRequest(image_size=8, eval_images=False))\n"
               f"except FastByolError as e:\n    print('ERR', e)\n", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pipe.png" in out.stdout and "not a regular file" in out.stdout
    assert check_image_file(root / "pipe.png") == "unreadable (not a regular file)"


@pytest.mark.parametrize("spec", ["/dev/zero", "/dev/null"])
def test_data_device_refused(spec):
    with pytest.raises(FastByolError, match="not a regular file"):
        resolve_dataset(spec)


def test_data_fifo_refused_under_numpy_format(tmp_path):
    os.mkfifo(tmp_path / "x.npz")
    out = _run(f"from fastbyol.data import resolve_dataset\nfrom fastbyol.errors import FastByolError\n"
               f"try:\n    resolve_dataset({str(tmp_path / 'x.npz')!r}, data_format='numpy')\n"
               f"except FastByolError as e:\n    print('ERR', e)\n", timeout=60)
    assert "ERR" in out.stdout and "not a regular file" in out.stdout, out.stderr


def _cifar10(folder: Path, bad_label: int) -> None:
    folder.mkdir()
    for name in ("data_batch_1", "test_batch"):
        labels = [i % 10 for i in range(8)]
        if name == "data_batch_1":
            labels[3] = bad_label
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": np.zeros((8, 3072), np.uint8), b"labels": labels}, f)


@pytest.mark.parametrize("bad", [10, -1, 255])
def test_cifar_labels_out_of_range(tmp_path, bad):
    _cifar10(tmp_path / "c", bad)
    with pytest.raises(FastByolError, match="data_batch_1"):
        load_cifar(tmp_path / "c")


def test_cifar_labels_in_range_load(tmp_path):
    _cifar10(tmp_path / "c", 9)
    assert load_cifar(tmp_path / "c").num_classes == 10


def _idx(path: Path, arr: np.ndarray, code: int) -> None:
    path.write_bytes(bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


@pytest.mark.parametrize("labels,code", [(np.array([0, -3], np.int8), 0x09),
                                         (np.array([0.0, 1.0], ">f4"), 0x0D),
                                         (np.array([0, 1, 2], np.uint8), 0x08)])
def test_idx_bad_labels(tmp_path, labels, code):
    for split in ("train", "t10k"):
        _idx(tmp_path / f"{split}-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8), 0x08)
        _idx(tmp_path / f"{split}-labels-idx1-ubyte", labels, code)
    with pytest.raises(FastByolError, match="labels-idx1"):
        resolve_dataset(str(tmp_path), data_format="idx")


@pytest.mark.parametrize("members,what", [
    (dict(train_images=np.array([object()], dtype=object)), "train_images"),
    (dict(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array(["a", "b"])), "labels"),
    (dict(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(3, np.int64)), "labels"),
    (dict(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros((2, 2), np.int64)), "labels"),
    (dict(images=np.zeros((2, 4, 4, 3), np.float32)), "uint8"),
    (dict(images=np.zeros((2, 4), np.uint8)), "shape"),
    (dict(train_images=np.zeros((2, 4, 4, 3), np.uint8), train_labels=np.zeros(2, np.int64),
          test_images=np.zeros((2, 4, 4, 3), np.uint8), test_labels=np.array([0, -1])), "must lie in 0..65535"),
    (dict(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 10**12])), "must lie in 0..65535"),
])
def test_npz_malformed_members(tmp_path, members, what):
    path = tmp_path / "d.npz"
    np.savez(path, **members)
    with pytest.raises(FastByolError, match=what) as e:
        load_numpy(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_shards_into_source_refused(tmp_path):
    from fastbyol.data.shards import write_shards

    src = tmp_path / "src"
    (src / "train" / "a").mkdir(parents=True)
    (src / "train" / "a" / "x.png").write_bytes(png())
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    for dst in (src, src / "train" / "a", src / "new"):
        with pytest.raises(FastByolError, match="inside the source folder"):
            write_shards(src, dst, progress=False)
    os.symlink(src / "train", tmp_path / "link")
    with pytest.raises(FastByolError, match="inside the source folder"):
        write_shards(src, tmp_path / "link" / "out", progress=False)
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
