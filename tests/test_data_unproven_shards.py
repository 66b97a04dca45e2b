"""The pre-flight decode of tar shards (fastbyol/data/shards.py, unproven.py): a member the header check passes but
cannot prove safe is decoded once, while the shard's index is built, in a child process reading the member's bytes
at its offset; one that fails is a bad sample of the shard; the index keeps the result; proven shards start no child.

The unproven members are JPEGs without Huffman table segments (tests/test_data_unproven.py builds them): standard
tables decode, optimized tables decode to garbage with a libjpeg warning; FASTBYOL_TEST_DECODE_CRASH stands in for a
decoder crash.
"""

import io
import json
import os
import tarfile

import pytest

pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")

from fastbyol.cli import main  # noqa: E402
from fastbyol.data import DataRequest, resolve_dataset  # noqa: E402
from fastbyol.data import unproven  # noqa: E402
from fastbyol.data.shards import index_name  # noqa: E402
from fastbyol.data.synthetic import write_synthetic_jpegs  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402

from tests.test_data_unproven import crashed_run, without_huffman_tables  # noqa: E402


@pytest.fixture(scope="module")
def good_jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    write_synthetic_jpegs(root, n_train=24, n_test=0, size=32, classes=1)
    return [p.read_bytes() for p in sorted((root / "train" / "class0").iterdir())]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))


def _shard(path, good: list[bytes], extra: dict[str, bytes]):
    """A shard of the good JPEGs (keys g00, g01, ...) then the extra members (name -> bytes), each with a cls."""
    path.parent.mkdir(parents=True, exist_ok=True)
    members = [(f"g{k:02d}.jpg", data) for k, data in enumerate(good)] + list(extra.items())
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            for member, blob in ((name, data), (name.split(".")[0] + ".cls", b"0")):
                info = tarfile.TarInfo(member)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return path


def _no_child(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a pre-flight decode child was started")

    monkeypatch.setattr(unproven, "_child", refuse)


def test_shards_of_proven_images_start_no_child(good_jpegs, tmp_path, monkeypatch):
    _no_child(monkeypatch)
    shard = _shard(tmp_path / "wds" / "a.tar", good_jpegs, {})
    ds = resolve_dataset(str(shard), DataRequest(image_size=16, eval_images=False))
    assert ds.skipped_files == 0 and ds.num_pretraining == 24


def test_unproven_members_that_decode_are_kept_in_one_child_and_never_decoded_again(good_jpegs, tmp_path,
                                                                                   monkeypatch):
    folder = tmp_path / "wds"
    _shard(folder / "a.tar", good_jpegs[:12], {"ua.jpg": without_huffman_tables(False, seed=1)})
    _shard(folder / "b.tar", good_jpegs[12:], {"ub.jpg": without_huffman_tables(False, seed=2)})
    calls = []
    real = unproven._child
    monkeypatch.setattr(unproven, "_child", lambda where, items: calls.append(items) or real(where, items))
    ds = resolve_dataset(str(folder), DataRequest(image_size=16, eval_images=False))
    assert ds.skipped_files == 0 and ds.num_pretraining == 26
    assert [[(os.path.basename(p), name) for p, _, _, name in items] for items in calls] == \
        [[("a.tar", "ua.jpg"), ("b.tar", "ub.jpg")]]  # both shards' members in one child, read from the shards
    _no_child(monkeypatch)  # the index holds the result
    assert resolve_dataset(str(folder), DataRequest(image_size=16, eval_images=False)).num_pretraining == 26


def test_an_unproven_member_the_decoder_refuses_is_a_bad_sample(good_jpegs, tmp_path, monkeypatch):
    shard = _shard(tmp_path / "wds" / "a.tar", good_jpegs, {"zz.jpg": without_huffman_tables(True)})
    with pytest.raises(FastByolError, match=rf"{shard}: sample zz: zz\.jpg: DALI cannot decode it .*Corrupt JPEG "
                                            r"data.*\[pre-flight decode: no Huffman tables.*--skip-bad-files"):
        resolve_dataset(str(shard), DataRequest(image_size=16, eval_images=False))
    _no_child(monkeypatch)  # decoded once: the index keeps the bad sample
    ds = resolve_dataset(str(shard), DataRequest(image_size=16, skip_bad_files=True, eval_images=False))
    assert ds.skipped_files == 1 and ds.num_pretraining == 24
    index = (tmp_path / "wds" / ".fastbyol" / "shards" / index_name(shard, ".idx")).read_text()
    assert " zz.jpg" not in index and " g00.jpg" in index  # DALI never reads it


def test_training_skips_the_garbled_member_and_never_reads_it(good_jpegs, tmp_path, capfd):
    shard = _shard(tmp_path / "wds" / "a.tar", good_jpegs, {"zz.jpg": without_huffman_tables(True)})
    out = tmp_path / "run"
    assert main(["train", "--data", str(shard), "--epochs", "1", "--batch-size", "8", "--image-size", "16",
                 "--skip-bad-files", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_files"] == 1 and summary["steps"] == 24 // 8
    assert summary["dataset"].startswith("wds: 24 train (24 encoded images"), summary  # left out before step 1
    assert "Corrupt JPEG" not in capfd.readouterr().err


def test_a_decoder_crash_names_the_member_in_one_line(good_jpegs, tmp_path, monkeypatch):
    """14 unproven members (more than one batch of the child); the 13th crashes it: found one by one."""
    extra = {f"u{k:02d}.jpg": without_huffman_tables(False, seed=k) for k in range(14)}
    shard = _shard(tmp_path / "wds" / "a.tar", good_jpegs, extra)
    assert crashed_run(shard, "u12.jpg", tmp_path / "run").startswith(
        f"fastbyol: error: {shard}: sample u12: u12.jpg: crashed the image decoder (SIGSEGV) [pre-flight decode: "
        "no Huffman tables")
    monkeypatch.setenv(unproven.CRASH_ENV, "u12.jpg")
    _no_child(monkeypatch)  # the index holds the result: nothing decoded again
    ds = resolve_dataset(str(shard), DataRequest(image_size=16, skip_bad_files=True, eval_images=False))
    assert ds.skipped_files == 1 and ds.num_pretraining == 24 + 13


def test_the_index_workers_decode_their_shards_unproven_members(good_jpegs, tmp_path):
    """Four shards: the index is built by worker processes (--shards), each decoding its own shards' members."""
    from fastbyol.data.shards import obtain_index

    folder = tmp_path / "wds"
    shards = [_shard(folder / f"s{k}.tar", good_jpegs[6 * k:6 * k + 6],
                     {f"x{k}.jpg": without_huffman_tables(k == 2, seed=k)}) for k in range(4)]
    metas, _, _ = obtain_index(shards, workers=2)
    assert [m["n"] for m in metas] == [7, 7, 6, 7]
    assert [len(m["bad"]) for m in metas] == [0, 0, 1, 0] and metas[2]["bad"][0][0] == "x2"
    assert "Corrupt JPEG data" in metas[2]["bad"][0][1]
