"""What many test files build: small datasets in the exact idx format, the trainer's command line, a free port,
and the one-line error check. Plain functions (imported by test modules); `conftest.py` wraps the common ones as
fixtures."""

import gzip
import re
import socket
import struct
import sys
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """`array` (uint8) as one idx file (the Fashion-MNIST format), gzip-compressed when `gz`."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def small_idx_dataset(folder: Path, n_train: int = 300, n_test: int = 100) -> Path:
    """The first `n_train` / `n_test` images of the embedded Fashion-MNIST as an idx folder `--data` reads."""
    from fastbyol.data import load_embedded

    ds = load_embedded()
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", ds.train_images[:n_train, ..., 0])
    write_idx(folder / "train-labels-idx1-ubyte", ds.train_labels[:n_train])
    write_idx(folder / "t10k-images-idx3-ubyte", ds.test_images[:n_test, ..., 0])
    write_idx(folder / "t10k-labels-idx1-ubyte", ds.test_labels[:n_test])
    return folder


def good_jpegs(tmp_path_factory, n: int) -> list[Path]:
    """`n` synthetic 32 px JPEGs of one class, sorted, in a folder of their own, and a fresh FASTBYOL_CACHE (module
    fixtures of the bad-file tests build their folders from these)."""
    import os

    from fastbyol.data.synthetic import write_synthetic_jpegs

    os.environ["FASTBYOL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    root = tmp_path_factory.mktemp("good")
    write_synthetic_jpegs(root, n_train=n, n_test=0, size=32, classes=1)
    return sorted((root / "train" / "class0").iterdir())


def train_cli(*argv: str) -> list[str]:
    """`fastbyol train ARGV` as a subprocess command line, with this interpreter."""
    return [sys.executable, "-m", "fastbyol", "train", *argv]


def free_port() -> int:
    """A TCP port nobody listens on now (for a gloo rendezvous on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, world: int, out, *args) -> list:
    """Run worker(rank, world, port, out, *args) in `world` processes (their gloo rendezvous on a free port) and return
    what each rank saved to f"{out}.{rank}" (torch.save), in rank order."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, free_port(), str(out), *args), nprocs=world, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(world)]


LOG_LINE = re.compile(r"step \d+/\d+ \(\d+%\) epoch ")  # the trainer's text line of a log point (run/textlog.py)


def without_log_lines(err: str) -> str:
    """stderr without the trainer's text log lines: it writes one a log point where stderr is not a terminal (a
    job's log), so a command that trained some steps before it stopped has them before its one line."""
    return "".join(ln for ln in err.splitlines(keepends=True) if not LOG_LINE.match(ln))


def one_line(capsys, *needles: str) -> str:
    """stderr so far is exactly one line, no traceback, and holds every needle; returns it."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def one_step_run(out: Path, n_metrics: int = 3, encoder=None, arch: str | None = None) -> Path:
    """A run folder as `fastbyol train` leaves it after one step of the default preset (config.json, checkpoint.pt
    with a LARS momentum for every online parameter, `n_metrics` metrics.jsonl records, none: no file), made
    directly: no DALI, no data, a second or two. encoder: an nn.Module of the user's own instead of the preset's, its
    config.json naming it as `arch` (as `train --arch ARCH` writes it)."""
    import json

    import torch

    from fastbyol.run.checkpoint import CHECKPOINT, RUN_ID_KEY, new_run_id, save_checkpoint
    from fastbyol.config import get_preset
    from fastbyol.optim import LARS
    from fastbyol.run.state import TrainState
    from fastbyol.train import build_model

    out.mkdir(parents=True)
    from fastbyol.models import BYOL

    cfg = get_preset("fmnist-tiny")
    if encoder is None:
        model = build_model(cfg, torch.device("cpu"))
    else:
        cfg.model.arch = arch
        model = BYOL(encoder, cfg.model.proj_hidden, cfg.model.proj_dim, cfg.model.pred_hidden, image_size=28)
    optimizer = LARS(model.online_parameters(), lr=0.1)
    x = torch.randn(4, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    p1, p2, z1, z2 = model(x, x)[:4]
    (p1 - z2).square().sum().add((p2 - z1).square().sum()).backward()
    optimizer.step()
    state = TrainState(step=1, num_images=300, torch_rngs=[torch.get_rng_state()], run_id=new_run_id())
    save_checkpoint(out / CHECKPOINT, state.to_checkpoint(model.state_dict(), optimizer.state_dict(), cfg.to_dict(),
                                                          "test"))
    (out / "config.json").write_text(json.dumps({RUN_ID_KEY: state.run_id, **cfg.to_dict()}))
    records = [dict(step=s, epoch=0, loss=1.0 / s, lr=0.1, tau=0.99, img_per_s=100.0) for s in range(1, n_metrics + 1)]
    if records:
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def descendant_pids(pid: int) -> list[int]:
    """Every process below `pid`: its children, theirs, and so on (read from /proc)."""
    found, todo = [], [pid]
    while todo:
        below = child_pids(todo.pop())
        found += below
        todo += below
    return found


def train_with(data: Path, out: Path, encoder=None, **settings):
    """`fastbyol.train` on `data` into `out`, quietly, with `encoder` (e.g. a tests/faults.py encoder) and any setting
    by its field name (epochs=1, batch_size=32, ckpt_every_steps=3, ...); knn_every 0 unless given. Returns what
    train returns; what it raises propagates."""
    import fastbyol.train as trainer
    from fastbyol.config import SECTIONS, get_preset

    cfg = get_preset("fmnist-tiny")
    cfg.data.data, cfg.run.out, cfg.run.knn_every = str(data), str(out), 0
    for name, value in settings.items():
        section = next(s for s, klass in SECTIONS.items() if name in klass.__dataclass_fields__)
        setattr(getattr(cfg, section), name, value)
    return trainer.train(cfg, progress=False, log=lambda *a, **k: None, encoder=encoder)


# ------------------------------------------------------------------------------------------------ the two-view loader
LOADER_DEFAULTS = dict(batch_size=16, image_size=16, seed=0, device="cpu", num_threads=1)


def two_view_loader(source, **kw):
    """The tests' TwoViewLoader: LOADER_DEFAULTS (batch 16, 16 px views, seed 0, the CPU, one DALI thread), any of
    them overridden by keyword, as are the other LoaderSettings fields (view1= and view2= set `views`), the
    AugmentConfig fields (decode=, cpu_parallel=, ...; or augment= a whole AugmentConfig) and the loader's own
    arguments (checkpoint, labels, reader_labels, make_pipeline). The `make_loader` fixture also closes what it
    built when the test ends."""
    import dataclasses

    from fastbyol.augment import VIEW1, VIEW2, LoaderSettings, TwoViewLoader
    from fastbyol.config import AugmentConfig

    own = {k: kw.pop(k) for k in ("checkpoint", "labels", "reader_labels", "make_pipeline") if k in kw}
    views = (kw.pop("view1", VIEW1), kw.pop("view2", VIEW2))
    settings_fields = {f.name for f in dataclasses.fields(LoaderSettings)}
    settings = {**LOADER_DEFAULTS, "views": views, **{k: kw.pop(k) for k in list(kw) if k in settings_fields}}
    augment = dataclasses.replace(kw.pop("augment", None) or AugmentConfig(), **kw)  # a stray name: TypeError
    return TwoViewLoader(source, LoaderSettings(**settings), augment, **own)


class PassThroughPipeline:
    """A fastbyol.augment.Pipeline around DALI's (the loader's make_pipeline=): every call passes through; a test
    subclasses it to spy on a call or to fail one, instead of reaching into the loader."""

    def __init__(self, graph, checkpoint):
        from fastbyol.augment import DaliPipeline

        self.real = DaliPipeline(graph, checkpoint)
        self.operators, self.decoders = self.real.operators, self.real.decoders

    def run(self, stream=None):
        return self.real.run(stream)

    def checkpoint(self):
        return self.real.checkpoint()

    def reset(self):
        self.real.reset()

    def close(self):
        self.real.close()
