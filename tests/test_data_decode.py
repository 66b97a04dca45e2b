"""A file that fails to decode is named in one line (exit 2) or skipped and counted; the process
never dies from it.

Root cause of the SIGSEGV (reproduced with DALI 2.4 on the CPU): DALI's image decoder parses the headers of a batch
of more than 4 x (threads + 1) samples on its thread pool; a header that fails to parse on a worker thread loses
its error and the decoder then decodes the unparsed sample. A file of FF D8 FF E0 + 2,000 random bytes + FF D9
crashed every run when it fell in a worker's block. The fix keeps such files away from DALI (checks.py walks every
JPEG header) and decodes the kNN images in batches small enough that DALI parses in the calling thread (decode.py).
"""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")

from PIL import Image  # noqa: E402

from fastbyol.data.checks import check_bytes  # noqa: E402
from fastbyol.data.decode import decode_encoded  # noqa: E402
from fastbyol.data.synthetic import write_synthetic_jpegs  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402

# The data layer's part of `fastbyol train`, in a fresh process, with the CLI's error handling: one line, exit 2.
PROBE = """
import sys
from fastbyol.data import DataRequest, resolve_dataset
from fastbyol.errors import FastByolError
try:
    ds = resolve_dataset(sys.argv[1], DataRequest(image_size=16, skip_bad_files=sys.argv[2] == "skip"))
    ds.wait_eval_images()
    print("skipped", ds.skipped_files, "train", len(ds.train_images))
except FastByolError as e:
    print(f"fastbyol: error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def garbage_jpeg(rng) -> bytes:
    """The issue's file: JPEG start and end markers, 2,000 random bytes between."""
    return b"\xff\xd8\xff\xe0" + rng.bytes(2000) + b"\xff\xd9"


def bad_scan_jpeg(rng) -> bytes:
    """Headers that pass the structural check, but the first scan of a progressive JPEG asks for DC coefficients 0..5
    (a DC scan must end at 0): libjpeg-turbo and OpenCV both refuse it, so only DALI's decoder can tell."""
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(b, "JPEG", progressive=True)
    data = bytearray(b.getvalue())
    sos = data.find(b"\xff\xda")
    data[sos + 5 + 2 * data[sos + 4] + 1] = 5  # Se of the first scan
    return bytes(data)


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    os.environ.setdefault("FASTBYOL_CACHE", str(tmp_path_factory.mktemp("cache")))
    # 70 files per class: batches larger than 4 x (threads + 1), as the SIGSEGV needed
    return write_synthetic_jpegs(tmp_path_factory.mktemp("good") / "d", n_train=140, n_test=20, size=32, classes=2)


def test_corrupt_jpeg_is_named_in_one_line_20_of_20(good_folder, tmp_path):
    """20 fresh processes, each a folder of good JPEGs and one bad file at a random place: 10 with the issue's file
    (caught by the header check), 10 with a file only DALI's decoder rejects (caught by the kNN decode)."""
    rng = np.random.default_rng(7)
    runs = []
    for k in range(20):
        root = tmp_path / f"r{k}"
        for split in ("train", "test"):
            for cls in ("class0", "class1"):
                (root / split / cls).mkdir(parents=True)
                for p in (good_folder / split / cls).iterdir():
                    os.link(p, root / split / cls / p.name)
        name = f"{int(rng.integers(0, 140)):06d}x.jpg"  # sorts among the good files
        data = garbage_jpeg(rng) if k % 2 == 0 else bad_scan_jpeg(rng)
        (root / "train" / f"class{k % 2}" / name).write_bytes(data)
        runs.append((root, name))
    procs = []
    for root, name in runs:  # two at a time: the machine has two cores
        procs.append((subprocess.Popen([sys.executable, "-c", PROBE, str(root), "strict"], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True), name))
        if len(procs) == 2:
            check_runs(procs)
            procs = []
    check_runs(procs)


def check_runs(procs):
    for p, name in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2, (p.returncode, err[-2000:])  # never -11 (SIGSEGV)
        ours = [ln for ln in err.splitlines() if ln.startswith("fastbyol: error:")]
        assert len(ours) == 1 and name in ours[0] and "Traceback" not in err, err[-2000:]


def test_corrupt_files_skipped_and_counted(good_folder, tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "skip"
    for split in ("train", "test"):
        for cls in ("class0", "class1"):
            (root / split / cls).mkdir(parents=True)
            for p in (good_folder / split / cls).iterdir():
                os.link(p, root / split / cls / p.name)
    (root / "train" / "class0" / "000010x.jpg").write_bytes(garbage_jpeg(rng))
    (root / "train" / "class1" / "000011x.jpg").write_bytes(bad_scan_jpeg(rng))
    res = subprocess.run([sys.executable, "-c", PROBE, str(root), "skip"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["skipped", "2", "train", "140"]  # one at the check, one at the decode


def test_png_corrupt_inside_is_named_without_libpng_noise(good_folder, tmp_path):
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(b, "PNG")
    data = bytearray(b.getvalue())
    data[len(data) // 2] ^= 0x5A  # inside IDAT: chunk structure intact, CRC wrong
    root = tmp_path / "png"
    (root / "train" / "a").mkdir(parents=True)
    for p in list((good_folder / "train" / "class0").iterdir())[:20]:
        os.link(p, root / "train" / "a" / p.name)
    (root / "train" / "a" / "broken.png").write_bytes(bytes(data))
    res = subprocess.run([sys.executable, "-c", PROBE, str(root), "strict"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "broken.png: corrupt PNG (CRC mismatch in chunk IDAT" in res.stderr


def test_decode_fallback_names_the_file_and_keeps_the_rest():
    """A batch that DALI rejects is decoded item by item: the culprit named (or skipped), the others' pixels equal to
    decoding each alone (the reference)."""
    rng = np.random.default_rng(5)
    goods = []
    for _ in range(13):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (int(rng.integers(20, 60)), 37, 3), dtype=np.uint8)).save(b, "JPEG")
        goods.append(b.getvalue())
    bad = bad_scan_jpeg(rng)
    assert check_bytes(bad) is None  # only the decoder can tell
    items = [(f"g{i}", lambda d=d: d) for i, d in enumerate(goods)]
    items.insert(5, ("the_bad_one.jpg", lambda: bad))
    with pytest.raises(FastByolError, match="the_bad_one.jpg: DALI cannot decode it"):
        decode_encoded(items, 16)
    images, kept, skipped = decode_encoded(items, 16, skip_bad=True)
    assert [s[0] for s in skipped] == ["the_bad_one.jpg"] and kept.tolist() == [i for i in range(14) if i != 5]
    alone = np.stack([decode_encoded([it], 16)[0][0] for it in items if it[0] != "the_bad_one.jpg"])
    np.testing.assert_array_equal(images, alone)
