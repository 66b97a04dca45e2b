"""Numeric settings a machine can hold, and the environment as input: each bad value ends in one line naming the
setting or variable, exit 2, before anything is allocated or written (no run folder)."""

import os
import subprocess

import pytest
import torch

from fastbyol.system.bounds import check_machine_bounds, max_threads, training_bytes
from fastbyol.cli import main
from fastbyol.config import get_preset
from fastbyol.system.environment import check_environment, fault_injection_count
from fastbyol.errors import FastByolError

from .support import one_line, train_cli

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in TORCHRUN_VARS + ("FASTBYOL_CACHE",):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _refused(cmd: list[str], run: os.PathLike, *needles: str, env: dict | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    for n in needles:
        assert n in done.stderr, done.stderr
    assert not os.path.exists(run), "a refused run left its folder behind"
    return done.stderr


def test_num_threads_far_beyond_the_cores_is_one_line_not_sigabrt(tmp_path):
    # main: DALI aborts the process (SIGABRT, no message) creating 100000 threads
    run = tmp_path / "run"
    _refused(train_cli("--num-threads", "100000", "--epochs", "1", "--out", str(run), "--no-progress"), run,
             "--num-threads 100000", str(max_threads()))


@pytest.mark.parametrize("flag, value", [("--proj-hidden", "1000000000"), ("--pred-hidden", "2000000"),
                                         ("--image-size", "100000"), ("--batch-size", "100000000")])
def test_sizes_past_any_model_are_refused_before_allocating(clean_env, tmp_path, capsys, flag, value):
    # main: --proj-hidden 1000000000 asks the allocator for 512 GB
    run = tmp_path / "run"
    assert main(["train", flag, value, "--epochs", "1", "--out", str(run), "--no-progress"]) == 2
    one_line(capsys, f"{flag} {value}", "more than this machine can hold")
    assert not run.exists()


def test_memory_estimate_names_the_setting_that_does_not_fit(clean_env, tmp_path, capsys):
    run = tmp_path / "run"  # within the plain bounds, but ~TBs of activations on any host
    assert main(["train", "--batch-size", "65536", "--image-size", "4096", "--out", str(run), "--no-progress"]) == 2
    one_line(capsys, "--batch-size 65536 at --image-size 4096", "GB of RAM here")
    assert not run.exists()


def test_memory_estimate_against_a_small_machine(monkeypatch):
    cfg = get_preset("fmnist-tiny")
    parts = training_bytes(cfg, cfg.data.batch_size)
    # the encoder's parameters, exactly: 4 fp32 copies (online weights, grads, momentum; target weights)
    from fastbyol.models import build_encoder
    n = sum(p.numel() for p in build_encoder(cfg.model.arch, cfg.model.stem, cfg.data.image_size).parameters())
    assert parts["encoder"] == 16 * n
    assert parts["activations"] > 0 and parts["heads"] > 0
    check_machine_bounds(cfg, torch.device("cpu"), 1)  # the default run fits this machine
    monkeypatch.setattr("fastbyol.system.bounds.machine_memory_bytes", lambda device: sum(parts.values()) - 1)
    with pytest.raises(FastByolError, match="--batch-size 128 at --image-size 28"):
        check_machine_bounds(cfg, torch.device("cpu"), 1)
    cfg.model.proj_hidden = 1 << 20  # the heads now dominate: the widest head setting is named
    with pytest.raises(FastByolError, match="--proj-hidden 1048576"):
        check_machine_bounds(cfg, torch.device("cpu"), 1)
    check_machine_bounds(get_preset("fmnist-tiny"), torch.device("cpu"), 2**20)  # per process: the batch divides


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "abc"}, "RANK='abc'"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
    ({"WORLD_SIZE": "-2"}, "WORLD_SIZE='-2'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 must be < WORLD_SIZE=2"),
    ({"RANK": "1"}, "RANK=1 must be < WORLD_SIZE=1"),
    ({"LOCAL_RANK": "x1"}, "LOCAL_RANK='x1'"),
    ({"LOCAL_RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "LOCAL_RANK=3"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"}, "MASTER_PORT=99999"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "port"}, "MASTER_PORT='port'"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "29500"}, "MASTER_ADDR=None"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "a b", "MASTER_PORT": "29500"}, "MASTER_ADDR='a b'"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
])
def test_torchrun_variables_are_checked(clean_env, tmp_path, capsys, env, needle):
    # main: RANK=abc is a ValueError traceback; WORLD_SIZE=0 or RANK >= WORLD_SIZE waits on a rendezvous forever
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(FastByolError, match="environment variable"):
        check_environment()
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(run), "--no-progress"]) == 2
    one_line(capsys, needle)
    assert not run.exists()


def test_a_good_torchrun_environment_passes(clean_env):
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}.items():
        clean_env.setenv(k, v)
    assert check_environment() == (1, 1, 4)
    clean_env.setenv("LOCAL_RANK", "2")
    with pytest.raises(FastByolError, match="LOCAL_RANK=2 must be < LOCAL_WORLD_SIZE=2"):
        check_environment()


def test_fastbyol_cache_naming_a_file_is_one_line(clean_env, tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.write_text("a file")
    clean_env.setenv("FASTBYOL_CACHE", str(cache))
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(run), "--no-progress"]) == 2
    one_line(capsys, "FASTBYOL_CACHE", "names a file")
    assert not run.exists()


def test_fault_injection_count_never_crashes(clean_env):
    clean_env.setenv("FASTBYOL_TEST_X", "garbage")
    assert fault_injection_count("FASTBYOL_TEST_X") == 0
    clean_env.setenv("FASTBYOL_TEST_X", "3")
    assert fault_injection_count("FASTBYOL_TEST_X") == 3


def test_bad_op_form_is_one_line_not_an_import_crash(tmp_path):
    # main: FASTBYOL_OP_FORM=garbage raises ValueError while importing the kernels (a traceback)
    run = tmp_path / "run"
    env = {**os.environ, "FASTBYOL_OP_FORM": "garbage", "FASTBYOL_TEST_KILL_IN_CHECKPOINT_WRITE": "junk",
           "FASTBYOL_TEST_KILL_SIGNAL": "NOPE"}
    _refused(train_cli("--epochs", "1", "--out", str(run), "--no-progress"), run, "FASTBYOL_OP_FORM='garbage'",
             env=env)
