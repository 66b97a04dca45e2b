"""`fastbyol plan` (fastbyol/tools/plan.py): the batch split, the --accumulate that fits, the memory and the time,
from the trainer's own FLOP count and memory bound; and the memory refusal of `fastbyol train` naming the
--accumulate that fits (fastbyol/system/bounds.py)."""

import pytest
import torch

from fastbyol.cli import main
from fastbyol.config import get_preset
from fastbyol.errors import FastByolError
from fastbyol.system.bounds import check_machine_bounds, fitting_accumulate, training_bytes
from fastbyol.tools.plan import USABLE_MEMORY, duration, machine, plan_run


def test_imagenet_resnet50_on_8_and_on_1_h100(capsys):
    assert main(["plan", "--preset", "imagenet-resnet50", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    for needle in ("4096 global = 8 GPUs x 512", "--accumulate 1", "GB a GPU", "65.1 GFLOP an image",
                   "ESTIMATE at an assumed 10% MFU", "1000 epochs",
                   "torchrun --standalone --nproc_per_node 8 -m fastbyol train --preset imagenet-resnet50 --data PATH"):
        assert needle in out, out
    one = plan_run(get_preset("imagenet-resnet50"), machine(1))
    assert (one.local_batch, one.accumulate, one.micro_batch) == (4096, 8, 512)  # 4096 a step on one GPU
    assert one.memory_need <= USABLE_MEMORY * 80e9 < one.memory_need + one.parts["activations"] / 8 * 512 * 7


def test_the_figures_are_the_trainers():
    cfg = get_preset("imagenet-resnet50-100ep")
    p = plan_run(cfg, machine(8, "A100"))
    parts = training_bytes(get_preset("imagenet-resnet50-100ep"), 512, activation_bytes=2)
    assert p.parts == parts  # the bound fastbyol train checks, at the micro-batch
    assert p.steps_per_epoch == (1_281_167 // 8) // 512
    rate = 8 * 312e12 * 0.10 / p.flops_per_image
    assert p.img_per_s == pytest.approx(rate)
    assert p.total_seconds == pytest.approx(100 * p.steps_per_epoch * 4096 / rate)
    measured = plan_run(get_preset("imagenet-resnet50-100ep"), machine(8), img_per_s=1000.0)
    assert measured.measured and measured.epoch_seconds == pytest.approx(p.steps_per_epoch * 4096 / 8000)
    assert "measured 1,000 img/s a GPU" in "\n".join(measured.lines())


def test_a_gpu_by_its_figures_and_an_accumulate_given(capsys):
    assert main(["plan", "--preset", "imagenet-resnet50", "--gpus", "1", "--tflops", "100", "--memory-gb", "24",
                 "--accumulate", "2"]) == 0
    out = capsys.readouterr().out
    assert "--accumulate 2 (micro-batches of 2048)" in out and "leaves the estimate above 75%" in out
    assert "--accumulate 2" in out.splitlines()[-1]


@pytest.mark.parametrize("argv, needle", [
    (["--gpu", "TPU"], "--gpu must be one of H100"),
    (["--tflops", "100"], "give both --tflops and --memory-gb"),
    (["--gpus", "3"], "--batch-size 128 (the global batch) does not divide over 3 GPUs"),
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--data", "/no/such/data"], "--images N: the number of pretraining images of --data /no/such/data"),
    (["--mfu", "2"], "--mfu must be in (0, 1]"),
    (["--arch", "mymodule:factory"], "an encoder of your own is not imported"),
    (["--preset", "imagenet-resnet50", "--images", "100"], "is larger than the 100 training images"),
])
def test_bad_plans_are_one_line(capsys, argv, needle):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_duration_reads():
    assert [duration(s) for s in (0.44, 45, 750, 3600 * 5 + 7 * 60, 86400 * 3 + 3600 * 4)] == \
        ["0.4 s", "45 s", "12 min 30 s", "5 h 07 min", "3 d 4 h"]


def test_the_memory_refusal_names_the_accumulate_that_fits(monkeypatch):
    cfg = get_preset("fmnist-tiny")
    parts = training_bytes(cfg, 128)
    fixed = parts["encoder"] + parts["heads"]
    room = fixed + parts["activations"] // 4  # a quarter of the batch's activations fit
    monkeypatch.setattr("fastbyol.system.bounds.machine_memory_bytes", lambda device: room)
    with pytest.raises(FastByolError, match=r"--batch-size 128 at --image-size 28 needs .* --accumulate 4 fits "
                                            r"\(micro-batches of 32 images"):
        check_machine_bounds(cfg, torch.device("cpu"), 1)
    cfg.optim.accumulate = 4  # the suggestion is taken: the check counts one micro-batch's activations
    check_machine_bounds(cfg, torch.device("cpu"), 1)
    assert fitting_accumulate(parts, 128, 128, room) == 4
    assert fitting_accumulate(parts, 128, 128, fixed) is None  # not even 2 images fit


def test_plan_reads_a_config_file(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("preset: imagenet-resnet50-100ep\nbatch_size: 1024\n")
    assert main(["plan", "--config", str(tmp_path / "r.yaml"), "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "1024 global = 1 GPU x 1024; --accumulate 2 (micro-batches of 512)" in out
    assert out.splitlines()[-1] == f"  command  fastbyol train --config {tmp_path / 'r.yaml'} --data PATH --accumulate 2"
