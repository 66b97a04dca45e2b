"""Caches know whose they are: a file or shard rewritten in place with its size and mtime kept (as `cp -p`, `rsync
-t` and `tar x` keep them) is seen as changed (its inode and ctime are part of its identity), a cache folder of
someone else's (or a symbolic link in its place) inside the data is never used, and a decode result cached for one
file never stands for another."""

import io
import os
import tarfile

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")

from fastbyol.data import DataRequest  # noqa: E402
from fastbyol.data import manifest as mf  # noqa: E402
from fastbyol.data.cache import cache_root, identity, own_cache_inside  # noqa: E402
from fastbyol.data.shards import index_dir, load_shards  # noqa: E402
from fastbyol.data.synthetic import write_synthetic_jpegs  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = write_synthetic_jpegs(tmp_path_factory.mktemp("src"), n_train=12, n_test=0, size=32, classes=1)
    return [p.read_bytes() for p in sorted((root / "train").rglob("*.jpg"))]


def _rewrite_keeping_size_and_mtime(path, edit) -> None:
    """Rewrite `path` in place with edit(bytes) of the same length, its mtime set back (cp -p, rsync -t, tar x)."""
    st = os.stat(path)
    data = edit(path.read_bytes())
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert identity(after) != identity(st)  # the ctime moved: no user can set it back


def _shards(tmp_path, jpegs, labels_of_test):
    d = tmp_path / "wds"
    d.mkdir()
    for name, labels in (("train-000000.tar", [i % 3 for i in range(8)]), ("test-000000.tar", labels_of_test)):
        with tarfile.open(d / name, "w", format=tarfile.USTAR_FORMAT) as t:
            for i, label in enumerate(labels):
                for ext, data in (("jpg", jpegs[i]), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    return d


def test_a_test_shard_whose_cls_members_are_rewritten_in_place_is_indexed_again(tmp_path, jpegs):
    """The hostile round's example: every `cls` of the test shard rewritten with size and mtime kept; the index served
    the old labels and the evaluation reported a wrong figure."""
    d = _shards(tmp_path, jpegs, [0, 1, 2, 0])
    before = load_shards(str(d), DataRequest(image_size=32, background=False))
    assert before.test_labels.tolist() == [0, 1, 2, 0]
    shard = d / "test-000000.tar"
    with tarfile.open(shard) as t:
        offsets = [m.offset_data for m in t.getmembers() if m.name.endswith(".cls")]

    def relabel(data: bytes) -> bytes:
        out = bytearray(data)
        for off in offsets:
            out[off] = ord("2") if out[off] == ord("0") else ord("0")
        return bytes(out)

    _rewrite_keeping_size_and_mtime(shard, relabel)
    after = load_shards(str(d), DataRequest(image_size=32, background=False))
    assert after.test_labels.tolist() == [2, 0, 0, 2]


def _folder(tmp_path, jpegs, n=4):
    root = tmp_path / "data"
    for k in range(2):
        (root / "train" / f"c{k}").mkdir(parents=True)
        for i in range(n):
            (root / "train" / f"c{k}" / f"{i}.jpg").write_bytes(jpegs[i])
    return root


def test_a_file_rewritten_in_place_makes_the_manifest_stale(tmp_path, jpegs):
    root = _folder(tmp_path, jpegs)
    mf.obtain(root)
    target = root / "train" / "c1" / "2.jpg"
    _rewrite_keeping_size_and_mtime(target, lambda b: b[:-2] + b"\0\0")  # no end-of-image marker any more
    man, _, status = mf.obtain(root)
    assert status == "rebuilt (file train/c1/2.jpg changed)"
    assert [b[0] for b in man.bad] == ["train/c1/2.jpg"]


def test_every_file_is_compared_in_the_background_check_too(tmp_path, jpegs, monkeypatch):
    """verify_files (every file, after the start-up sample) compares identities, not sizes and mtimes alone."""
    root = _folder(tmp_path, jpegs)
    man, _, _ = mf.obtain(root)
    monkeypatch.setattr(mf, "SAMPLE_CHECK", 0)
    target = root / "train" / "c0" / "1.jpg"
    _rewrite_keeping_size_and_mtime(target, lambda b: b[:-2] + b"\0\0")
    assert mf.obtain(root)[2] == "fresh"  # the sample (none here) did not see it
    assert mf.verify_files(man.location, man.root) == [["train/c0/1.jpg", "truncated JPEG (no end-of-image marker)"]]
    assert not (man.location / mf.MANIFEST_NAME).exists()  # the next run rescans


def test_a_cache_folder_inside_the_data_is_used_only_when_it_is_this_users(tmp_path, jpegs):
    root = _folder(tmp_path, jpegs)
    assert own_cache_inside(root) == root / ".fastbyol"
    (root / ".fastbyol").rename(tmp_path / "elsewhere")
    (root / ".fastbyol").symlink_to(tmp_path / "elsewhere")  # a link: never followed into
    assert own_cache_inside(root) is None
    man, _, _ = mf.obtain(root)
    assert man.location.is_relative_to(cache_root()) and not list((tmp_path / "elsewhere").iterdir())
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    (root / ".fastbyol").unlink()
    (root / ".fastbyol").mkdir()
    os.chown(root / ".fastbyol", 12345, 12345)  # someone else's: their manifest is neither read nor replaced
    assert own_cache_inside(root) is None and own_cache_inside(root, "shards") is None
    assert mf.obtain(root)[0].location.is_relative_to(cache_root())
    assert not list((root / ".fastbyol").iterdir())


def test_a_shard_index_inside_someone_elses_folder_is_not_used(tmp_path, jpegs):
    d = _shards(tmp_path, jpegs, [0, 1])
    assert index_dir([d / "train-000000.tar"]) == d / ".fastbyol" / "shards"
    (d / ".fastbyol" / "shards").rmdir()
    (d / ".fastbyol" / "shards").symlink_to(tmp_path)
    assert index_dir([d / "train-000000.tar"]).is_relative_to(cache_root())


def test_a_decode_result_is_kept_for_the_file_it_was_made_for(tmp_path, jpegs):
    """decoded.json keys a pre-flight decode by the file's identity: the same name, size and mtime on a rewritten
    file is decoded again."""
    from fastbyol.data.unproven import DECODED, prove

    root = _folder(tmp_path, jpegs, n=1)
    folder = tmp_path / "loc"
    folder.mkdir()
    rel = "train/c0/0.jpg"
    ids = np.array([identity(os.stat(root / rel))])
    assert prove(str(root), [rel], ids, folder) == [None]
    cached = (folder / DECODED).read_text()
    _rewrite_keeping_size_and_mtime(root / rel, lambda b: b[:200] + bytes(len(b) - 202) + b"\xff\xd9")
    reasons = prove(str(root), [rel], np.array([identity(os.stat(root / rel))]), folder)
    assert (folder / DECODED).read_text() != cached and len(reasons) == 1
