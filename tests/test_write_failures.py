"""Every write maps its failures: export (torch.save, safetensors), plot (matplotlib) and the JSON writers on a full
disk (a 64 KiB tmpfs) or a read-only file system end in one line naming the path, exit 2, the previous file intact
and no temporary left. Needs root (mount); skipped cleanly where mounting is not allowed."""

import json
import subprocess

import pytest

from fastbyol.run.disk import atomic_write_json
from fastbyol.cli import main
from fastbyol.errors import FastByolError

from .support import one_line, one_step_run

PREVIOUS = b"the previous file\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return one_step_run(tmp_path_factory.mktemp("writes") / "run")


def _mount(folder, options: str) -> None:
    folder.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode(errors='replace').strip()[:100]})")


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB file system holding one small previous file per name the test asks for."""
    folder = tmp_path / "full"
    _mount(folder, "size=64k,mode=0755")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def read_only(tmp_path):
    folder = tmp_path / "ro"
    _mount(folder, "size=64k,mode=0755")
    for name in ("enc.pt", "enc.safetensors", "curves.png", "eval.json"):
        (folder / name).write_bytes(PREVIOUS)
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def _intact(folder, name: str) -> None:
    assert (folder / name).read_bytes() == PREVIOUS
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"


@pytest.mark.parametrize("name", ["enc.pt", "enc.safetensors"])
def test_export_onto_a_full_disk(run_dir, full_disk, capsys, name):
    # main: .pt is `RuntimeError: [enforce fail at inline_container.cc]` mapped, but safetensors' save_file writes in
    # place (a half-written file, an OSError traceback)
    (full_disk / name).write_bytes(PREVIOUS)
    assert main(["export", str(run_dir), "--out", str(full_disk / name)]) == 2
    one_line(capsys, str(full_disk / name), "no space left")
    _intact(full_disk, name)


def test_plot_onto_a_full_disk(run_dir, full_disk, capsys):
    # main: matplotlib's savefig raises OSError [Errno 28] (a traceback) and leaves a truncated PNG
    (full_disk / "curves.png").write_bytes(PREVIOUS)
    (full_disk / "filler").write_bytes(b"\0" * (64 * 1024 - 4096 * 3))  # room for a few KiB: not for the PNG
    assert main(["plot", str(run_dir), "--out", str(full_disk / "curves.png")]) == 2
    one_line(capsys, str(full_disk / "curves.png"), "no space left")
    _intact(full_disk, "curves.png")


@pytest.mark.parametrize("command, name, why", [("export", "enc.pt", "not writable"),
                                               ("export", "enc.safetensors", "not writable"),
                                               ("plot", "curves.png", "read-only")])
def test_writes_onto_a_read_only_file_system(run_dir, read_only, capsys, command, name, why):
    # main, plot: the temporary file's mkstemp raises OSError [Errno 30] outside the mapping (a traceback)
    assert main([command, str(run_dir), "--out", str(read_only / name)]) == 2
    one_line(capsys, str(read_only / name), why)
    _intact(read_only, name)


def test_json_writer_maps_its_failures(read_only, full_disk):
    with pytest.raises(FastByolError, match="eval.json: the file system is read-only; the previous file is kept"):
        atomic_write_json(read_only / "eval.json", {"a": 1})
    _intact(read_only, "eval.json")
    (full_disk / "eval.json").write_bytes(PREVIOUS)
    with pytest.raises(FastByolError, match="eval.json: no space left"):
        atomic_write_json(full_disk / "eval.json", {"x": "y" * 100_000})
    _intact(full_disk, "eval.json")
    atomic_write_json(full_disk / "eval.json", {"a": 1})  # a write that fits still works
    assert json.loads((full_disk / "eval.json").read_text()) == {"a": 1}
