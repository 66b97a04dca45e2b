"""WebDataset tar shards: --data forms, the index, DALI's reader per rank, exact resume, the cls parser against
int(), bad input, `fastbyol shards`, and training from shards."""

import hashlib
import io
import os
import json
import tarfile
from argparse import Namespace

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from fastbyol.cli import main  # noqa: E402
from fastbyol.data import DataRequest, resolve_dataset  # noqa: E402
from fastbyol.data.shards import (ShardSource, expand_braces, index_name, load_shards, parse_cls,  # noqa: E402
                                  run_shards, shard_paths, write_shards)
from fastbyol.data.synthetic import write_synthetic_jpegs  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402

from .support import PassThroughPipeline  # noqa: E402


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))
    return write_synthetic_jpegs(tmp_path / "src", n_train=40, n_test=12, size=32, classes=4)


@pytest.fixture
def shards(folder, tmp_path):
    write_shards(folder, tmp_path / "wds", max_samples=12, progress=False)
    return tmp_path / "wds"


def md5(b) -> str:
    return hashlib.md5(bytes(b)).hexdigest()


def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_expand_braces():
    assert expand_braces("d/train-{000000..000002}.tar") == [f"d/train-00000{i}.tar" for i in range(3)]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    with pytest.raises(FastByolError, match="not a numeric range"):
        expand_braces("x-{a..c}.tar")


def test_forms_and_missing_shards(shards):
    train, test = shard_paths(str(shards))
    assert [p.name for p in train] == [f"train-00000{i}.tar" for i in range(4)] and len(test) == 1
    train2, test2 = shard_paths(f"{shards}/train-{{000000..000003}}.tar")
    assert train2 == train and test2 == test  # test-*.tar beside train-* shards
    with pytest.raises(FastByolError, match=r"train-000004.tar: missing shard \(1 of the 5"):
        resolve_dataset(f"{shards}/train-{{000000..000004}}.tar")
    with pytest.raises(FastByolError, match="no shard matches"):
        resolve_dataset(f"{shards}/val-{{000000..000003}}.tar")


def test_shards_equal_the_folder(folder, shards):
    """Same samples, labels and decoded kNN images as the folder they were written from."""
    a = resolve_dataset(str(shards), DataRequest(image_size=16))
    b = resolve_dataset(str(folder), DataRequest(image_size=16))
    assert a.num_pretraining == b.num_pretraining == 40 and a.num_classes == b.num_classes == 4 and a.has_knn
    for split in ("train", "test"):
        xa, ya = getattr(a, f"{split}_images"), getattr(a, f"{split}_labels")
        xb, yb = getattr(b, f"{split}_images"), getattr(b, f"{split}_labels")
        assert sorted(md5(x) + str(y) for x, y in zip(xa, ya)) == sorted(md5(x) + str(y) for x, y in zip(xb, yb))
    assert set(a.startup_seconds) >= {"listing", "checks", "index", "eval images"}
    assert (shards / ".fastbyol" / "shards" / index_name(shards / "train-000000.tar", ".idx")).is_file()
    assert (shards / "classes.txt").read_text().splitlines()[3] == "3 class3"


def read_epoch(src, shard_id, num_shards, n):
    @pipeline_def
    def pipe():
        encoded, label = src.dali_reader(shard_id, num_shards)
        return encoded, label

    p = pipe(batch_size=1, num_threads=1, device_id=None, seed=0)
    p.build()
    out = []
    for _ in range(n):
        e, y = p.run()
        out.append((md5(np.array(e[0])), int(np.array(y[0]))))
    return out


def test_each_rank_reads_its_part_with_labels(folder, shards):
    ds = load_shards(str(shards), DataRequest(image_size=16, eval_images=False), with_labels=True)
    src = ds.pretraining_source
    src.initial_fill = 1  # no shuffle buffer: each rank's part in order
    got = read_epoch(src, 0, 2, 20) + read_epoch(src, 1, 2, 20)
    want = sorted((md5(p.read_bytes()), int(p.parent.name[-1])) for p in (folder / "train").rglob("*.jpg"))
    assert sorted(got) == want


def test_exact_resume_through_dali_checkpointing(shards):
    src = load_shards(str(shards), DataRequest(image_size=16, eval_images=False), with_labels=True).pretraining_source

    @pipeline_def(enable_checkpointing=True)
    def pipe():
        encoded, label = src.dali_reader(0, 1)
        return fn.random.uniform(range=[0.0, 1.0]), label, fn.cast(encoded.shape(), dtype=types.INT64)

    def batches(p, n):
        return [[np.array(o.as_tensor()).tolist() for o in p.run()] for _ in range(n)]

    p = pipe(batch_size=7, num_threads=1, device_id=None, seed=3)
    p.build()
    batches(p, 4)
    state = p.checkpoint()
    after = batches(p, 9)  # crosses an epoch (40 samples)
    q = pipe(batch_size=7, num_threads=1, device_id=None, seed=3, checkpoint=state)
    q.build()
    assert batches(q, 9) == after


def test_cls_parser_equals_int():
    rng = np.random.default_rng(0)
    values = [0, 7, 10, 999, 1000, 123456789] + rng.integers(0, 10**9, 30).tolist()
    texts = [str(v).encode() + (b"\n" if i % 3 == 0 else b"") for i, v in enumerate(values)]

    @pipeline_def
    def pipe():
        raw = fn.external_source(source=lambda: [np.frombuffer(t, np.uint8) for t in texts], batch=True,
                                 dtype=types.UINT8)
        return parse_cls(raw)

    p = pipe(batch_size=len(texts), num_threads=1, device_id=None)
    p.build()
    (out,) = p.run()
    assert [int(np.array(out[i])) for i in range(len(texts))] == [int(t) for t in texts]


def write_tar(path, samples):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for name, data in samples:
            add(t, name, data)


def test_bad_samples_named_or_skipped(folder, tmp_path):
    jpgs = sorted((folder / "train").rglob("*.jpg"))
    good = [(f"s{i:03d}.jpg", p.read_bytes()) for i, p in enumerate(jpgs[:8])] + \
        [(f"s{i:03d}.cls", str(i % 2).encode()) for i in range(8)]
    good.sort()
    d = tmp_path / "bad"
    d.mkdir()
    write_tar(d / "a.tar", good[:8] + [("t900.cls", b"1")] + good[8:])  # a sample without an image
    with pytest.raises(FastByolError, match=r"a.tar: sample t900: the sample has no image"):
        resolve_dataset(str(d / "a.tar"))
    ds = resolve_dataset(str(d / "a.tar"), DataRequest(skip_bad_files=True, eval_images=False))
    assert ds.skipped_files == 1 and ds.num_pretraining == 8
    # an image that fails the check inside the tar
    write_tar(d / "b.tar", good + [("zz.jpg", b"\xff\xd8\xff\xe0" + bytes(300) + b"\xff\xd9")])
    with pytest.raises(FastByolError, match=r"b.tar: sample zz: zz.jpg: corrupt JPEG"):
        resolve_dataset(str(d / "b.tar"))
    # a truncated tar: named; skipped, the whole samples before the cut stay
    data = (d / "b.tar").read_bytes()
    cut = data.index(b"s005.jpg") + 700
    (d / "c.tar").write_bytes(data[:cut])
    with pytest.raises(FastByolError, match=r"c.tar: truncated tar \(member"):
        resolve_dataset(str(d / "c.tar"))
    ds = resolve_dataset(str(d / "c.tar"), DataRequest(skip_bad_files=True, eval_images=False))
    assert ds.num_pretraining == 5 and ds.skipped_files == 1
    # a shard rewritten later: its index is rebuilt
    write_tar(d / "c.tar", good)
    assert resolve_dataset(str(d / "c.tar"), DataRequest(eval_images=False)).num_pretraining == 8


def test_shards_command(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["shards", str(folder), str(out), "--max-samples", "16", "--no-progress"]) == 0
    msg = capsys.readouterr().out
    assert "wrote 3 train + 1 test shards (52 samples" in msg and "train-{000000..000002}.tar" in msg
    with tarfile.open(out / "train-000000.tar") as t:
        names = t.getnames()
    assert names[0].endswith(".jpg") and names[1].endswith(".cls") and len(names) == 32
    assert main(["shards", str(folder), str(out), "--no-progress"]) == 2  # refuses to mix with existing shards
    assert "already holds .tar files" in capsys.readouterr().err
    # a bad file: one line, nothing written (not even a partial folder)
    (folder / "train" / "class0" / "zz.jpg").write_bytes(b"\xff\xd8\xff" + bytes(40) + b"\xff\xd9")
    empty = tmp_path / "none"
    assert run_shards_cli(folder, empty) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zz.jpg: corrupt JPEG" in err
    assert sorted(p.name for p in empty.iterdir()) in ([], [".lock"])  # the folder's lock, released
    assert run_shards(Namespace(src=str(folder), dst=str(empty), max_samples=100, max_bytes=1e9, seed=0,
                                skip_bad_files=True, no_progress=True)) == 0
    assert "1 bad files skipped" in capsys.readouterr().out


def run_shards_cli(src, dst) -> int:
    return main(["shards", str(src), str(dst), "--no-progress"])


def test_training_from_shards(shards, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", f"{shards}/train-{{000000..000003}}.tar", "--epochs", "1", "--batch-size", "8",
                 "--image-size", "16", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 // 8 and summary["knn_top1"] is not None


def test_source_contract(shards):
    src = load_shards(str(shards), DataRequest(image_size=16, eval_images=False)).pretraining_source
    assert isinstance(src, ShardSource) and len(src) == 40 and src.labels is None
    assert "wds" in src.where


def test_damaged_or_stale_index_is_rebuilt_and_gray_is_detected(folder, tmp_path):
    from PIL import Image

    d = tmp_path / "g"
    (d / "train" / "a").mkdir(parents=True)
    for i, p in enumerate(sorted((folder / "train").rglob("*.jpg"))[:6]):
        Image.open(p).convert("L").save(d / "train" / "a" / f"{i}.png")  # one grey channel
    write_shards(d, tmp_path / "gw", progress=False)
    ds = resolve_dataset(str(tmp_path / "gw"), DataRequest(eval_images=False))
    assert ds.gray and ds.num_pretraining == 6
    meta = tmp_path / "gw" / ".fastbyol" / "shards" / index_name(tmp_path / "gw" / "train-000000.tar",
                                                                  ".meta.npz")
    data = bytearray(meta.read_bytes())
    data[len(data) // 2] ^= 0xFF
    meta.write_bytes(bytes(data))
    assert resolve_dataset(str(tmp_path / "gw"), DataRequest(eval_images=False)).num_pretraining == 6
    assert meta.read_bytes() != bytes(data)  # rewritten
    assert not resolve_dataset(str(folder), DataRequest(eval_images=False)).gray  # colour JPEGs


def test_index_is_built_once(shards, monkeypatch):
    import fastbyol.data.shards as sh

    resolve_dataset(str(shards), DataRequest(eval_images=False))

    def no_rebuild(*a, **k):
        raise AssertionError("a fresh index must not be rebuilt")

    monkeypatch.setattr(sh, "build_shard_metas", no_rebuild)
    ds = resolve_dataset(str(shards), DataRequest(eval_images=False))
    assert ds.num_pretraining == 40 and ds.startup_seconds["index"] >= 0


def test_failed_sample_names_the_file():
    from fastbyol.data.decode import failed_sample

    class Folder:
        root = "/data/set"

    msg = "Critical error in pipeline:\nError in CPU operator ...\nFailed to decode sample #48 : train/a/x y.jpg\n"
    assert failed_sample(Folder(), msg) == "/data/set/train/a/x y.jpg"
    assert failed_sample(object(), "Failed to decode sample #2 : /s/a.tar:410112:00200.jpg") == \
        "/s/a.tar:410112:00200.jpg"
    assert failed_sample(Folder(), "nvImageCodec failure: '#3'") is None


def test_loader_names_the_file_dali_cannot_decode(make_loader, folder):
    """A file that passes the header checks but fails in DALI's decoder: the loader's error names it, completed with
    the dataset's root (the decoder's own message gives the path relative to it)."""
    src = resolve_dataset(str(folder), DataRequest(eval_images=False)).pretraining_source
    rel = "train/1/broken file.jpg"

    class Broken(PassThroughPipeline):  # the checkpoint before the batch is real (a vague error's batch is read again)
        def run(self, stream=None):
            raise RuntimeError(f"Critical error in pipeline:\nFailed to decode sample #3 : {rel}\nmore")

    with pytest.raises(FastByolError) as e:
        make_loader(src, batch_size=8, make_pipeline=Broken).draw()
    assert str(e.value).startswith(f"{os.path.join(src.root, rel)}: does not decode (DALI: Critical error")

    class Vague(PassThroughPipeline):
        def run(self, stream=None):
            raise RuntimeError("nvImageCodec failure: '#3'")

    # the batch read again from the checkpoint decodes: no file to blame, the folder is named
    with pytest.raises(FastByolError, match="DALI failed on a batch of .*: nvImageCodec failure"):
        make_loader(src, batch_size=8, make_pipeline=Vague).draw()
