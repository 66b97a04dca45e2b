"""pytest-benchmark of one whole BYOL training step: ours against the plain PyTorch step, same model and batch.
CPU here: the tiny ResNet at 28 px, batch 64; on CUDA: ResNet-50 at 224 px, batch 256 (bf16 for ours)."""

import pytest
import torch

from fastbyol.tools.bench_step import StepCase, bench_step

from .conftest import DEVICE

CASE = (dict(arch="resnet50", size=224, batch=256, proj_hidden=4096, stem="auto") if DEVICE.type == "cuda"
        else dict(arch="resnet-tiny", size=28, batch=64, proj_hidden=1024, stem="small-s2"))


@pytest.mark.parametrize("variant", ["plain", "fastbyol"])
def test_byol_step(benchmark, variant):
    result = {}

    def run():
        result.update(bench_step(StepCase(CASE["arch"], CASE["size"], CASE["batch"], variant,
                                          proj_hidden=CASE["proj_hidden"], stem=CASE["stem"]), steps=3, warmup=1))

    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info.update(result)
    assert result["img_per_s"] > 0 and torch.isfinite(torch.tensor(result["step_ms"]))
