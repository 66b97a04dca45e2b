"""The run directory (fastbyol/run/files.py): nothing in it is followed, nothing of a failed new run is left, a trained
run is saved before its final evaluation, hostile metrics lines and failed writes end in one line."""

import errno
import os

import pytest

from fastbyol.run.checkpoint import load_checkpoint
from fastbyol.run.disk import RunLock
from fastbyol.cli import main
from fastbyol.errors import FastByolError, TrainingStopped
from fastbyol.run.disk import describe_write_error
from fastbyol.run.files import RunFiles

from .faults import FaultyEncoder
from .support import one_line as _one_line
from .support import train_with

SMALL = ["--epochs", "1", "--batch-size", "32", "--no-progress", "--knn-every", "0"]


@pytest.fixture(scope="module")
def data(small_idx_data):
    return small_idx_data(128, 64)


def test_a_lock_symlink_is_never_followed(data, tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / RunLock.NAME).symlink_to(target)
    with pytest.raises(FastByolError, match="symbolic link"):
        RunLock(out)  # the lock taken by a resume, too
    # a folder holding only a lock symlink is not empty: a new run is refused and changes nothing
    assert main(["train", "--data", str(data), "--out", str(out), *SMALL]) == 2
    _one_line(capsys, str(out))
    assert target.read_text() == "keep me\n"
    assert [p.name for p in out.iterdir()] == [RunLock.NAME] and (out / RunLock.NAME).is_symlink()


def test_out_inside_data_is_refused(tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    out = folder / "a" / "run"
    assert main(["train", "--data", str(folder), "--out", str(out), *SMALL]) == 2
    _one_line(capsys, "inside --data", str(out))
    assert not out.exists()


def test_any_failure_before_the_first_step_removes_the_new_run(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="no kernel"):  # not a FastByolError, inside the first step
        train_with(data, out, FaultyEncoder("raise"), epochs=1, batch_size=32)
    assert not out.exists()
    kept = tmp_path / "kept"  # an empty folder given as --out stays, emptied again
    kept.mkdir()
    with pytest.raises(RuntimeError, match="no kernel"):
        train_with(data, kept, FaultyEncoder("raise"), epochs=1, batch_size=32)
    assert kept.is_dir() and list(kept.iterdir()) == []


def test_a_failed_final_evaluation_keeps_the_trained_run(data, tmp_path):
    import fastbyol.train as trainer

    full = tmp_path / "full"
    _, expected = train_with(data, full, FaultyEncoder(), epochs=1, batch_size=32)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:  # the CLI prints it as its one line
        train_with(data, out, FaultyEncoder("eval-error"), epochs=1, batch_size=32)
    message = str(stopped.value)
    assert "final evaluation failed" in message and "index 10" in message and str(out / "checkpoint.pt") in message
    state = load_checkpoint(out / "checkpoint.pt")["state"]
    assert state["step"] == expected["steps"] and not state["finished"]
    # a lock symlink planted in the run folder is refused on resume, its target untouched (the pid not written)
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (out / ".lock").unlink()
    (out / ".lock").symlink_to(target)
    with pytest.raises(FastByolError, match="symbolic link"):
        trainer.train(None, progress=False, log=lambda *a: None, resume=out, encoder=FaultyEncoder())
    assert target.read_text() == "keep me\n"
    (out / ".lock").unlink()
    _, summary = trainer.train(None, progress=False, log=lambda *a: None, resume=out, encoder=FaultyEncoder())
    # the evaluation ran again, nothing else: the figures of the run that never failed
    assert summary["params_sha256"] == expected["params_sha256"] and summary["steps"] == expected["steps"]
    assert summary["knn_top1"] == pytest.approx(expected["knn_top1"], abs=1e-9)


def test_metrics_lines_that_are_not_records_are_dropped_with_a_warning(tmp_path):
    lines = ["[1, 2]", "3", '"text"', "null", '{"step": 1, "loss": 2.0}', '{"step": "x"}', '{"step": 9}',
             '{"step": 2, "final": true}', '{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    warnings = []
    files = RunFiles(tmp_path, writes=True, log=warnings.append)
    files._truncate_metrics(4)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    assert len(warnings) == 1 and "6 lines that are not metric records" in warnings[0]


def test_a_metrics_symlink_is_not_followed_on_resume(tmp_path):
    target = tmp_path / "elsewhere.jsonl"
    target.write_text('{"step": 1}\n{"step": 9}\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(target)
    with pytest.raises(FastByolError, match="symbolic link"):
        RunFiles(run, writes=True)._truncate_metrics(4)
    assert target.read_text() == '{"step": 1}\n{"step": 9}\n'


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES])
def test_write_failures_are_one_line_naming_the_path(tmp_path, code):
    # torch.save's zip writer raises a RuntimeError while handling the OSError: the chain is followed
    try:
        try:
            raise OSError(code, os.strerror(code))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    except RuntimeError as wrapped:
        mapped = describe_write_error(wrapped, tmp_path / "checkpoint.pt")
    assert isinstance(mapped, FastByolError) and str(mapped).startswith(str(tmp_path / "checkpoint.pt"))
    assert "\n" not in str(mapped)
    assert describe_write_error(RuntimeError("something else"), tmp_path) is None

    class Full:
        def write(self, text):
            raise OSError(code, os.strerror(code))

    files = RunFiles(tmp_path, writes=True)
    files.metrics = Full()
    with pytest.raises(FastByolError, match="metrics.jsonl"):
        files.write_metrics({"step": 1, "loss": 1.0})
    (tmp_path / "summary.json").write_text("{}")
    files.dir = tmp_path / "missing" / "folder"  # the summary's folder is gone: not one of the mapped errors
    with pytest.raises(FileNotFoundError):
        files.write_summary({"a": 1})


def test_the_encoded_sources_declare_the_protocol(tmp_path):
    import numpy as np

    from fastbyol.data.dataset import EncodedSource
    from fastbyol.data.folders import FileList
    from fastbyol.data.shards import ShardSource

    files = FileList([str(tmp_path / "train" / "a" / "x.png")], np.zeros(1, np.int64))
    shards = ShardSource([str(tmp_path / "s.tar")], [str(tmp_path / "s.idx")], 1, "shards")
    assert isinstance(files, EncodedSource) and isinstance(shards, EncodedSource)
    assert not isinstance(np.zeros((1, 8, 8, 3), np.uint8), EncodedSource)  # the array source is the other kind
