"""The wheel: fastbyol.kernels inside, no top-level `kernels` (PyPI has a package of that name), data included."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (path,) = out.glob("fastbyol-*.whl")
    return path


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package would clash on PyPI"
    for required in ("fastbyol/kernels/__init__.py", "fastbyol/kernels/loss.py", "fastbyol/kernels/ema.py",
                     "fastbyol/data/fashion_mnist/t10k-images-idx3-ubyte.gz",
                     "fastbyol/data/fashion_mnist/LICENSE"):
        assert required in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fastbyol = fastbyol.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_kernels_import_from_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    code = ("import fastbyol.kernels as k, fastbyol.data as d; "
            "from fastbyol.kernels import byol_loss, byol_loss_symmetric, ema_update_; "
            "print(k.__file__); print(len(d.load_embedded().train_images))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    kernels_file, n_images = res.stdout.split()
    assert Path(kernels_file).is_relative_to(target)
    assert n_images == "8000"
