"""`fastbyol finetune RUN --subset FILE` on an image-folder run: the file names images by their path relative to the
train folder or by a bare file name unique in the split (the paper's ImageNet subset lists), or by 0-based index;
the fine-tune trains on exactly those images. A missing or ambiguous name, a mixture of the two forms, an empty file
and file names for a dataset without them are each one line, exit 2, before anything is written."""

import json

import numpy as np
import pytest

pytest.importorskip("PIL")
pytest.importorskip("nvidia.dali")

from PIL import Image  # noqa: E402

from fastbyol.cli import main  # noqa: E402
from fastbyol.evaluation.finetune import image_picker  # noqa: E402
from fastbyol.evaluation.results import subset_tag  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402

from .support import one_line, small_idx_dataset  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-epoch run on train/class<k>/NNNN.png (+ dup.png in class0 and class1) and test/class<k>/."""
    root = tmp_path_factory.mktemp("finetune-subset")
    rng = np.random.default_rng(0)
    for split, n in (("train", 36), ("test", 12)):
        for i in range(n):
            (root / "data" / split / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "data" / split / f"class{i % 3}" / f"{i:04d}.png")
    for k in (0, 1):
        Image.fromarray(np.full((20, 20, 3), 60 * k, np.uint8)).save(root / "data" / "train" / f"class{k}" / "dup.png")
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTBYOL_CACHE", str(root / "cache"))
        assert main(["train", "--data", str(root / "data"), "--epochs", "1", "--batch-size", "16", "--image-size",
                     "16", "--out", str(out), "--no-progress", "--no-online-probe"]) == 0
    return out


def _finetune(run_dir, subset, *flags):
    return main(["finetune", str(run_dir), "--subset", str(subset), "--epochs", "1", "--batch-size", "2",
                 "--no-progress", *flags])


def _name(subset):
    """The result file of _finetune's run on `subset` (its name and digest, the epochs and batch of _finetune)."""
    return f"finetune-{subset_tag(subset, subset.read_bytes())}-epochs1-batch_size2.json"


def _written(run_dir):
    return sorted(p.name for p in run_dir.glob("finetune-*.json"))


def test_file_names_and_relative_paths_pick_those_images(run_dir, tmp_path):
    subset = tmp_path / "names.txt"
    subset.write_text("0000.png\nclass1/0001.png\n# a comment\n\n./class2/0002.png\n0003.png\nclass1/dup.png\n"
                      "0000.png\n")  # a name given twice counts once
    assert _finetune(run_dir, subset) == 0
    result = json.loads((run_dir / _name(subset)).read_text())
    assert result["subset_images"] == 5 and result["subset_per_class"] == [2, 2, 1]
    assert result["subset_file"] == str(subset)


def test_indices_keep_working(run_dir, tmp_path):
    subset = tmp_path / "indices.txt"
    subset.write_text("0\n7\n# seven\n12\n")
    assert _finetune(run_dir, subset) == 0
    assert json.loads((run_dir / _name(subset)).read_text())["subset_images"] == 3


@pytest.mark.parametrize("text, needles", [
    ("0001.png\ndup.png\n", ["bad.txt, line 2", "'dup.png'", "2 images", "class0/dup.png", "class1/dup.png"]),
    ("0001.png\nclass0/0001.png\n", ["bad.txt, line 2", "'class0/0001.png'", "not an image of the train split"]),
    ("0001.png\nmissing.JPEG\n", ["bad.txt, line 2", "'missing.JPEG'", "not an image of the train split"]),
    ("0\n0001.png\n", ["bad.txt", "mixes indices (line 1", "file names (line 2", "'0001.png'"]),
    ("# only a comment\n\n", ["bad.txt", "names no image"]),
    ("3\n99\n", ["bad.txt, line 2", "'99'", "indices 0..37"]),
])
def test_bad_subset_files_are_one_line_before_anything_is_written(run_dir, tmp_path, capsys, text, needles):
    before = _written(run_dir)
    subset = tmp_path / "bad.txt"
    subset.write_text(text)
    assert _finetune(run_dir, subset) == 2
    one_line(capsys, "fastbyol: error: --subset", *needles)
    assert _written(run_dir) == before


def test_file_names_need_an_image_folder(run_dir, tmp_path, capsys):
    data = small_idx_dataset(tmp_path / "idx", 40, 20)
    subset = tmp_path / "names.txt"
    subset.write_text("0000.png\n")
    before = _written(run_dir)
    assert _finetune(run_dir, subset, "--data", str(data)) == 2
    one_line(capsys, f"--subset {subset}", "image folder", "0-based index")
    assert _written(run_dir) == before


def test_picker_resolves_paths_then_unique_names():
    pick = image_picker("s.txt", [(1, "b/x.JPEG"), (2, "y.JPEG"), (3, "a\\x.JPEG")])
    assert pick(["a/x.JPEG", "b/x.JPEG", "a/y.JPEG"]).tolist() == [0, 1, 2]
    with pytest.raises(FastByolError, match=r"s.txt, line 1: 'x.JPEG' is the name of 2 images"):
        image_picker("s.txt", [(1, "x.JPEG")])(["a/x.JPEG", "b/x.JPEG"])
