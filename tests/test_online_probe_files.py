"""The online probe's labels for encoded files (labelled image folders and tar shards): the DALI reader's label of
each sample is the graph's last output, so every batch's labels are those of its own images, in DALI's order; the
views and every draw are those of the graph without it; a data checkpoint saved by the other graph is refused in one
line; BYOL trains bit for bit as without the probe (params_sha256), whose curve lands in metrics.jsonl."""

import json

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")

from PIL import Image  # noqa: E402

from fastbyol.cli import main  # noqa: E402
from fastbyol.data import DataRequest, resolve_dataset  # noqa: E402
from fastbyol.data.shards import load_shards, write_shards  # noqa: E402
from fastbyol.data.synthetic import write_synthetic_jpegs  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402
from fastbyol.evaluation.probe import probe_labels, probe_reads_labels  # noqa: E402


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """train/class<k>/ and test/class<k>/ of random PNGs (lossless: DALI's decoded pixels identify the file)."""
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    pixels = {}
    for split, n in (("train", 48), ("test", 12)):
        for i in range(n):
            k = i % 3
            (root / split / f"class{k}").mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / split / f"class{k}" / f"{i:04d}.png")
            if split == "train":
                pixels[img.tobytes()] = k
    return root, pixels


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))


def _sources(png_folder, tmp_path):
    root, _ = png_folder
    write_shards(root, tmp_path / "wds", max_samples=16, progress=False)
    request = DataRequest(image_size=16, eval_images=False)
    return {"folder": resolve_dataset(str(root), request).pretraining_source,
            "shards": load_shards(str(tmp_path / "wds"), request).pretraining_source}


KW = dict(batch_size=8, seed=5)  # the loaders' settings here, beside make_loader's defaults


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_each_batch_carries_its_own_images_labels(make_loader, png_folder, tmp_path, kind):
    source = _sources(png_folder, tmp_path)[kind]
    assert source.labelled and source.labels is None  # labelled, though the pretraining graph reads no label yet
    loader = make_loader(source, reader_labels=True, **KW)
    assert loader.with_labels and loader.output_names[-1] == "labels"
    seen = []
    for _ in range(2 * loader.steps_per_epoch):  # two epochs: the reader reshuffles between them
        out = loader.draw()
        labels = loader.batch_labels(out)
        images = [np.asarray(out["pixels"][i]).tobytes() for i in range(len(out["pixels"]))]
        assert labels.dtype.is_floating_point is False and labels.shape == (8,)
        assert labels.tolist() == [png_folder[1][b] for b in images]  # the class of each decoded file
        seen += images
    assert len(set(seen)) > 8  # the batches moved through the data


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_labels_leave_the_views_and_draws_unchanged(make_loader, png_folder, tmp_path, kind):
    source = _sources(png_folder, tmp_path)[kind]
    plain, labelled = make_loader(source, **KW), make_loader(source, reader_labels=True, **KW)
    assert not plain.with_labels
    for (a1, a2), (b1, b2, labels) in zip(plain.epoch(), labelled.epoch()):
        assert np.array_equal(a1.numpy(), b1.numpy()) and np.array_equal(a2.numpy(), b2.numpy())
        assert labels.shape == (8,)


def test_a_checkpoint_resumes_only_into_the_graph_that_saved_it(make_loader, png_folder, tmp_path):
    """DALI restores a checkpoint only into the graph that saved it: one saved without the labels' operators is
    refused by a loader that reads labels (one line), and one saved with them resumes exactly, labels and all."""
    source = _sources(png_folder, tmp_path)["folder"]
    plain = make_loader(source, **KW)
    next(plain.epoch())
    with pytest.raises(FastByolError, match="the checkpoint's data position cannot be restored into this data pipeline"):
        make_loader(source, reader_labels=True, checkpoint=plain.state(), **KW)
    with_labels = make_loader(source, reader_labels=True, **KW)
    batches = with_labels.epoch()
    next(batches)
    state = with_labels.state()
    want = list(batches)
    again = make_loader(source, reader_labels=True, checkpoint=state, **KW)
    got = list(again.epoch(first_step=1))
    assert len(got) == len(want) == with_labels.steps_per_epoch - 1
    for w, g in zip(want, got):
        assert len(g) == 3 and all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(w, g))


def test_unlabelled_files_give_no_probe_labels(make_loader, tmp_path):
    root = write_synthetic_jpegs(tmp_path / "f", n_train=8, n_test=4, size=16, classes=2)
    (root / "unlabeled").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "unlabeled" / "u.png")
    ds = resolve_dataset(str(root), DataRequest(image_size=16, eval_images=False))
    assert ds.has_knn and not ds.pretrain_files.labelled  # unlabeled/ among them
    assert probe_labels(ds) is None and not probe_reads_labels(ds)
    with pytest.raises(FastByolError, match="all labelled"):
        make_loader(ds.pretraining_source, reader_labels=True, **KW)
    with pytest.raises(FastByolError, match="labels= is one label per image of an array source"):
        make_loader(ds.pretraining_source, labels=np.zeros(8, np.int64), **KW)
    (root / "unlabeled" / "u.png").unlink()
    (root / "unlabeled").rmdir()
    labelled = resolve_dataset(str(root), DataRequest(image_size=16, eval_images=False))
    assert probe_reads_labels(labelled) and probe_labels(labelled) is None  # the reader's, not an array's


def _train(data, out, *flags):
    assert main(["train", "--data", str(data), "--epochs", "3", "--batch-size", "16", "--image-size", "16",
                 "--out", str(out), "--no-progress", "--knn-every", "1", "--log-every", "2", *flags]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_probe_on_files_does_not_change_byol_training(png_folder, tmp_path, kind, capsys):
    root, _ = png_folder
    data = root
    if kind == "shards":
        write_shards(root, tmp_path / "wds", max_samples=16, progress=False)
        data = tmp_path / "wds"
    with_s, with_rows = _train(data, tmp_path / "with")  # on by default: the files are labelled
    without_s, without_rows = _train(data, tmp_path / "without", "--no-online-probe")
    assert "online probe: off" not in capsys.readouterr().out
    assert with_s["params_sha256"] == without_s["params_sha256"]
    assert [r["loss"] for r in with_rows if "loss" in r] == [r["loss"] for r in without_rows if "loss" in r]
    curve = [r for r in with_rows if "online_probe_top1" in r]
    assert [r.get("final", False) for r in curve] == [False, False, True]  # each kNN check, then the end
    assert all(0.0 <= r["online_probe_top1"] <= 100.0 and "knn_top1" in r for r in curve)
    assert with_s["online_probe_top1"] == curve[-1]["online_probe_top1"]
    assert without_s["online_probe_top1"] is None and not any("online_probe_top1" in r for r in without_rows)
