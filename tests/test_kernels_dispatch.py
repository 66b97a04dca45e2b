"""The kernel-selection switch: read once from FASTBYOL_KERNELS at import, changed by `set_backend`, and a bad
selection stops `fastbyol train` with one line (exit 2) before any run folder exists."""

import os
import subprocess
import sys

import pytest
import torch

from fastbyol.kernels import KernelBackendError, backend, kernel_backend, set_backend


def test_set_backend_switches_and_validates(select_backend):
    select_backend("reference")
    assert backend() == "reference" and kernel_backend(torch.device("cpu")) == "reference"
    previous = set_backend("auto")
    assert previous == "reference" and kernel_backend(torch.device("cpu")) == "reference"  # auto: CPU -> reference
    with pytest.raises(KernelBackendError, match="'fast' is not one of auto, triton, reference"):
        set_backend("fast")
    assert backend() == "auto"  # a refused value changes nothing


def test_environment_is_read_once_not_per_call(select_backend, monkeypatch):
    select_backend("reference")
    monkeypatch.setenv("FASTBYOL_KERNELS", "triton")  # after import: no effect until set_backend
    assert kernel_backend(torch.device("cpu")) == "reference"


@pytest.mark.parametrize("value, message", [
    ("garbage", "FASTBYOL_KERNELS='garbage' is not one of auto, triton, reference"),
    ("triton", "FASTBYOL_KERNELS=triton on cpu tensors needs TRITON_INTERPRET=1"),
])
def test_bad_selection_is_one_line_and_leaves_no_run_folder(tmp_path, value, message):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTBYOL_KERNELS"] = value
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "fastbyol", "train", "--epochs", "1", "--device", "cpu", "--out",
                        str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
