"""Logs a cluster can read: the plain text line of a log point (fastbyol/run/textlog.py), the tags every dashboard
shows (fastbyol/run/scalars.py), and the Weights & Biases sink in offline mode (fastbyol/run/wandb_sink.py), its
scalars read back from the file wandb writes, with no network."""

import io
import json
import struct
import time
from pathlib import Path

import pytest

from fastbyol.run.scalars import scalar_tags
from fastbyol.run.textlog import TextLog, text_lines_wanted

RECORD = dict(step=120, epoch=1, loss=0.43214, lr=0.1123, tau=0.99123, img_per_s=805.2, mfu=None,
              data_wait_share=0.031)


def test_a_log_point_is_one_readable_line_with_an_eta():
    clock = iter([100.0, 130.0])
    lines = []
    log = TextLog(total_steps=992, epochs=16, write=lines.append, clock=lambda: next(clock))
    log.write(RECORD)
    log.write(dict(step=125, epoch=1, knn_top1=70.0, knn_subset=4000))  # not a log point: no line
    log.write({**RECORD, "step": 130})
    assert lines[0] == "step 120/992 (12%) epoch 2/16 loss 0.4321 lr 0.112 tau 0.9912 805 img/s data wait 3%"
    assert lines[1].endswith("eta 43 min 06 s")  # 3 s a step since the first log point, 862 steps left
    assert "\r" not in "".join(lines)


def test_text_lines_when_stderr_is_a_file_or_the_bar_is_off():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert text_lines_wanted(True, io.StringIO()) and text_lines_wanted(False, Tty())
    assert not text_lines_wanted(True, Tty())


def test_tags_are_tensorboards():
    assert scalar_tags(RECORD) == {"train/loss": 0.43214, "train/lr": 0.1123, "train/tau": 0.99123,
                                   "train/img_per_s": 805.2, "train/data_wait_share": 0.031}
    assert scalar_tags(dict(step=5, epoch=3, knn_top1=70.0, knn_subset=4000, online_probe_top1=60.0)) == \
        {"knn/top1_subset": 70.0, "probe/top1_subset": 60.0}
    assert scalar_tags(dict(step=0, epoch=-1, knn_top1=69.0, init="random", final=True)) == \
        {"knn/top1_random_init": 69.0}


def test_tensorboard_gets_the_same_tags(tmp_path):
    from fastbyol.run.reporting import TensorBoardSink

    seen = []

    class Writer:
        def add_scalar(self, tag, value, step):
            seen.append((tag, value, step))

    sink = TensorBoardSink(tmp_path)
    sink.writer = Writer()
    sink.write(RECORD)
    assert seen == [(tag, value, 120) for tag, value in scalar_tags(RECORD).items()]


def wandb_records(folder: Path) -> list:
    """The records of the one run-*.wandb file under `folder` (W&B's own format: a 7-byte header, then LevelDB-log
    blocks of 32 KiB whose records are wandb_internal_pb2.Record messages)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = folder.rglob("run-*.wandb")
    data, i, pending, records = path.read_bytes(), 7, b"", []
    while i + 7 <= len(data):
        if 32768 - i % 32768 < 7:  # a block's tail too short for a header is padding
            i += 32768 - i % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[i:i + 7])
        if length == 0 and kind == 0:
            break
        pending += data[i + 7:i + 7 + length]
        i += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item) -> str:
    """A history or summary item's name: W&B stores "train/loss" as the nested key ["train", "loss"]."""
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_writes_the_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from fastbyol.run.wandb_sink import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    sink = WandbSink("fastbyol-test", tmp_path / "run", "a-run", {"optim": {"epochs": 2}})
    records = [RECORD, {**RECORD, "step": 130, "loss": 0.4},
               dict(step=130, epoch=1, knn_top1=71.5, knn_subset=4000),
               dict(step=140, epoch=1, knn_top1=72.0, final=True), dict(step=0, epoch=-1, knn_top1=69.0,
                                                                        init="random", final=True)]
    for r in records:
        sink.write(r)
    sink.close()
    for _ in range(300):  # wandb's service process finishes the file after finish() returns
        found = list((tmp_path / "run" / "wandb").rglob("run-*.wandb"))
        if found and any(r.WhichOneof("record_type") == "exit" for r in wandb_records(tmp_path / "run" / "wandb")):
            break
        time.sleep(0.1)
    logged = [(r.history.step.num, {_key(item): float(item.value_json) for item in r.history.item
                                    if not _key(item).startswith("_")})
              for r in wandb_records(tmp_path / "run" / "wandb") if r.WhichOneof("record_type") == "history"]
    assert logged == [(120, scalar_tags(RECORD)), (130, {**scalar_tags(records[1]), "knn/top1_subset": 71.5})] \
        or logged == [(120, scalar_tags(RECORD)), (130, scalar_tags(records[1])), (130, {"knn/top1_subset": 71.5})]
    summary = {}
    for r in wandb_records(tmp_path / "run" / "wandb"):
        if r.WhichOneof("record_type") == "summary":
            summary.update({_key(item): item.value_json for item in r.summary.update})
    assert float(summary["knn/top1"]) == 72.0 and float(summary["knn/top1_random_init"]) == 69.0
    assert (tmp_path / "run" / "wandb" / "run-id").is_file()


def test_wandb_missing_is_one_line(monkeypatch):
    import builtins

    from fastbyol.errors import FastByolError
    from fastbyol.run.wandb_sink import WandbSink

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "wandb"
                        else real(name, *a, **k))
    with pytest.raises(FastByolError, match=r"--wandb p: needs the wandb package: pip install 'fastbyol\[wandb\]'"):
        WandbSink("p", Path("/nonexistent"), "n", {})


def _train(tmp_path, data, *extra):
    """`fastbyol train` as a subprocess with stderr to a file (a job's log): 2 epochs of 4 steps on small data."""
    import subprocess
    import sys

    log = tmp_path / "train.log"
    with open(log, "w") as err:
        res = subprocess.run([sys.executable, "-m", "fastbyol", "train", "--data", str(data), "--epochs", "2",
                              "--batch-size", "32", "--image-size", "16", "--knn-every", "1", "--log-every", "2",
                              "--out", str(tmp_path / "run"), *extra], stdout=subprocess.PIPE, stderr=err, text=True,
                             timeout=600, env={**__import__("os").environ, "WANDB_MODE": "offline",
                                               "WANDB_SILENT": "true"})
    assert res.returncode == 0, log.read_text()[-2000:]
    return log.read_text(), res.stdout


def test_a_run_logging_to_a_file_writes_readable_lines(small_idx_data, tmp_path):
    text, _ = _train(tmp_path, small_idx_data(128, 32))
    lines = [ln for ln in text.splitlines() if ln.startswith("step ")]
    assert "\r" not in text  # no progress bar in a file
    assert [ln.split()[1] for ln in lines] == ["2/8", "4/8", "6/8", "8/8"], text
    assert all(" loss " in ln and " lr " in ln and " tau " in ln and "img/s" in ln and "data wait" in ln
               for ln in lines)
    assert "eta" in lines[-2] and "epoch 2/2" in lines[-1]


def test_a_wandb_run_offline_writes_its_scalars(small_idx_data, tmp_path):
    pytest.importorskip("wandb")
    _train(tmp_path, small_idx_data(128, 32), "--wandb", "fastbyol-test")
    folder = tmp_path / "run" / "wandb"
    for _ in range(300):
        if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(folder)):
            break
        time.sleep(0.1)
    history = [r for r in wandb_records(folder) if r.WhichOneof("record_type") == "history"]
    logged = {_key(item) for r in history for item in r.history.item}
    assert {"train/loss", "train/lr", "train/tau", "train/img_per_s", "knn/top1_subset"} <= logged
    metrics = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = sorted({r.history.step.num for r in history})
    assert steps == sorted({m["step"] for m in metrics if not m.get("final")})
