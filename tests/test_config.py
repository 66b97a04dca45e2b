"""One config path: flags and help generated from the dataclass fields, every field checked by validate(), saved configs
read back by from_dict, the derived values computed once by resolve()."""

import dataclasses
import json
import math

import pytest

from fastbyol.cli import _build_parser, main
from fastbyol.config import PRESETS, SECTIONS, Config, allowed_values, field_kind, flag_name, get_preset
from fastbyol.errors import FastByolError


def _all_fields():
    return [(section, f) for section, klass in SECTIONS.items() for f in dataclasses.fields(klass)]


def test_every_setting_has_one_help_string_and_a_flag(capsys):
    with pytest.raises(SystemExit):
        _build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    for _, f in _all_fields():
        assert f.metadata["help"], f"{f.name} has no help"
        assert flag_name(f.name) in help_text


def test_presets_validate():
    for name in PRESETS:
        get_preset(name).validate()


# one bad value per rule: every numeric field, nan and inf for every float, every choice
def _bad_values():
    cases = []
    for section, f in _all_fields():
        kind = field_kind(f)
        if kind is float:
            cases += [(section, f.name, math.nan), (section, f.name, math.inf), (section, f.name, -math.inf)]
        if allowed_values(f) is not None:
            cases.append((section, f.name, "no-such-value"))
    cases += [("data", "image_size", 7), ("data", "batch_size", 1), ("data", "num_threads", 0),
              ("data", "crop_min_area", 0.0), ("data", "crop_min_area", 1.5), ("data", "data", ""),
              ("data", "data", "  "), ("model", "proj_hidden", 0), ("optim", "epochs", 0), ("optim", "base_lr", -1.0),
              ("optim", "warmup_epochs", -1.0), ("optim", "weight_decay", -1e-6), ("optim", "momentum", 1.0),
              ("optim", "tau_base", 1.5), ("run", "seed", -1), ("run", "seed", 2**32), ("run", "log_every", 0),
              ("run", "ckpt_every_steps", -1), ("run", "knn_k", 0), ("run", "knn_subset", 0),
              ("run", "profile", "5"), ("run", "profile", "5:5"), ("run", "profile", "a:b"), ("run", "profile", "-1:4"),
              ("model", "arch", "resnet99"), ("model", "stem", "weird"), ("augment", "hw_decoder_load", -0.1),
              ("augment", "hw_decoder_load", 1.5), ("augment", "preallocate_side", 0), ("augment", "chunk_pixels", 0),
              ("distributed", "bn_group", -1), ("distributed", "bucket_mb", -1.0),
              ("distributed", "bucket_mb", float("nan"))]
    return cases


@pytest.mark.parametrize("section,name,value", _bad_values())
def test_validate_names_every_bad_setting(section, name, value):
    cfg = get_preset("fmnist-tiny")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(FastByolError) as e:
        cfg.validate()
    assert flag_name(name) in str(e.value)


def test_validate_rejects_wrong_types():
    cfg = get_preset("fmnist-tiny")
    cfg.data.batch_size = 12.5
    with pytest.raises(FastByolError, match="--batch-size must be int"):
        cfg.validate()


def test_from_dict_round_trip_and_refusals():
    cfg = get_preset("stl10-resnet18")
    cfg.run.profile = "3:6"
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert Config.from_dict({**cfg.to_dict(), "resolved": {"anything": 1}}) == cfg  # saved beside the config
    raw = cfg.to_dict()
    raw["optim"]["epochs"] = "ten"
    with pytest.raises(FastByolError, match="optim.epochs must be int"):
        Config.from_dict(raw, where="config.json")
    raw = cfg.to_dict()
    raw["model"]["depth"] = 3
    with pytest.raises(FastByolError, match="unknown setting model.depth"):
        Config.from_dict(raw)
    with pytest.raises(FastByolError, match="not a fastbyol config"):
        Config.from_dict([1, 2])
    raw = cfg.to_dict()
    raw["optim"]["base_lr"] = 1  # an int in a float field is fine (JSON writes 1.0 as 1 in some tools)
    assert Config.from_dict(raw).optim.base_lr == 1.0
    raw = cfg.to_dict()
    del raw["data"]["blur_window"]  # every setting is written: one missing is not a config of this fastbyol
    with pytest.raises(FastByolError, match="no setting data.blur_window"):
        Config.from_dict(raw)
    raw = cfg.to_dict()
    del raw["augment"]  # a section every run has written: its absence is refused
    with pytest.raises(FastByolError, match="no 'augment' section"):
        Config.from_dict(raw)


def test_a_config_from_before_the_distributed_section_reads_with_its_defaults():
    """Runs written before the distributed section existed resume, evaluate and export: the section's defaults are
    what those runs trained with (all off); a distributed section that is there is read as written."""
    cfg = get_preset("fmnist-tiny")
    raw = cfg.to_dict()
    del raw["distributed"]
    assert Config.from_dict(raw) == cfg
    raw = cfg.to_dict()
    raw["distributed"]["bn_group"] = 8
    assert Config.from_dict(raw).distributed.bn_group == 8
    raw["distributed"]["bucket"] = 1
    with pytest.raises(FastByolError, match="unknown setting distributed.bucket"):
        Config.from_dict(raw)


def test_the_augment_section_is_saved_and_required():
    """config.json holds the augment section (its defaults are the chain's module constants); one without it, or
    with a partial or mistyped section, is refused naming what is wrong."""
    from fastbyol.config import AugmentConfig
    from fastbyol.augment.photometric import CHUNK_PIXELS

    cfg = get_preset("imagenet-resnet50")
    raw = cfg.to_dict()
    assert raw["augment"] == dataclasses.asdict(AugmentConfig())
    assert Config.from_dict(raw) == cfg
    assert dataclasses.asdict(AugmentConfig()) == dict(cuda_photometric="triton", decode="roi", hw_decoder_load=0.9,
                                                       preallocate_side=512, chunk_pixels=1 << 17,
                                                       cpu_parallel="processes")
    assert CHUNK_PIXELS == AugmentConfig().chunk_pixels  # the chain's default is the setting's
    raw["augment"] = {**raw["augment"], "decode": 2}
    with pytest.raises(FastByolError, match="augment.decode must be str"):
        Config.from_dict(raw)
    raw["augment"] = {"decode": "once"}
    with pytest.raises(FastByolError, match="no setting augment.cuda_photometric"):
        Config.from_dict(raw)
    del raw["augment"]
    with pytest.raises(FastByolError, match="no 'augment' section"):
        Config.from_dict(raw)


def test_augment_flags_reach_the_config():
    from fastbyol.cli import config_from_args

    args = _build_parser().parse_args(["train", "--decode", "once", "--cpu-parallel", "threads", "--chunk-pixels",
                                       "4096", "--hw-decoder-load", "0.5", "--preallocate-side", "640",
                                       "--cuda-photometric", "compiled"])
    a = config_from_args(args).augment
    assert (a.decode, a.cpu_parallel, a.chunk_pixels, a.hw_decoder_load, a.preallocate_side, a.cuda_photometric) == \
        ("once", "threads", 4096, 0.5, 640, "compiled")


def test_resolve_derives_the_run_values():
    cfg = get_preset("fmnist-tiny")
    plan = cfg.resolve("cpu", 1, 8000)
    assert (plan.local_batch, plan.steps_per_epoch, plan.total_steps) == (128, 62, 16 * 62)
    assert plan.warmup_steps == 62 and plan.peak_lr == pytest.approx(4.0 * 128 / 256)
    assert plan.compile_mode == "off" and not plan.autocast_bf16 and plan.input_dtype == "float32"
    cuda = cfg.resolve("cuda", 4, 8000)
    assert (cuda.local_batch, cuda.steps_per_epoch) == (32, 2000 // 32)
    assert cuda.compile_mode == "default" and cuda.autocast_bf16 and cuda.input_dtype == "float16"
    cfg.run.profile = "2:5"
    assert cfg.resolve("cpu", 1, 8000).profile_steps == (2, 5)
    with pytest.raises(FastByolError, match="does not divide over 3 processes"):
        cfg.resolve("cpu", 3, 8000)
    with pytest.raises(FastByolError, match="BatchNorm needs at least 2"):
        cfg.resolve("cpu", 128, 80000)
    with pytest.raises(FastByolError, match="larger than the 100 training images"):
        cfg.resolve("cpu", 1, 100)
    cfg.distributed.bn_group = 4  # BN statistics over blocks of 4 ranks: the processes must divide into them
    assert cfg.resolve("cpu", 8, 8000).world_size == 8 and cfg.resolve("cpu", 1, 8000).world_size == 1
    for group, world in ((4, 2), (3, 4)):
        cfg.distributed.bn_group = group
        with pytest.raises(FastByolError, match=f"--bn-group {group} does not divide the {world} processes"):
            cfg.resolve("cpu", world, 8000)


@pytest.mark.parametrize("args,message", [
    (["--arch", "resnet99"], "--arch must be one of"),
    (["--stem", "weird"], "--stem must be one of"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--batch-size", "1"], "--batch-size must be >= 2"),
    (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number >= 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--base-lr", "inf"], "--base-lr must be a finite number > 0"),
    (["--data", ""], "--data must not be empty"),
    (["--profile", "9:3"], "--profile must be START:STOP"),
    (["--decode", "twice"], "--decode must be one of roi, once"),
    (["--hw-decoder-load", "2"], "--hw-decoder-load must be in [0, 1]"),
    (["--cpu-parallel", "fibers"], "--cpu-parallel must be one of processes, threads"),
    (["--bn-group", "-2"], "--bn-group must be >= 0"),
    (["--grad-reduce", "fp16"], "--grad-reduce must be one of fp32, bf16"),
    (["--bucket-mb", "-1"], "--bucket-mb must be a finite number >= 0"),
])
def test_bad_settings_are_one_line_exit_2_and_leave_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_resume_refuses_settings(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--epochs", "3", "--base-lr", "1"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--epochs, --base-lr" in err and err.count("\n") == 1


def test_every_environment_variable_is_in_the_one_table():
    """docs/environment.md lists every environment variable the code reads or sets (os.environ in fastbyol/,
    kernels/ and benchmarks/): a new one without its row fails here."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    use = re.compile(r"""(?:environ(?:\.get|\.setdefault|\.pop)?\(\s*|environ\[|_env_int\(|dict\(os\.environ,\s*)"""
                     r"""["']?([A-Z][A-Z0-9_]+)""")
    found = set()
    for folder in ("fastbyol", "kernels", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            found |= set(use.findall(path.read_text()))
    table = (root / "docs" / "environment.md").read_text()
    assert {"TRITON_INTERPRET", "FASTBYOL_KERNELS", "RANK", "FASTBYOL_CACHE"} <= found  # the scan sees them
    missing = sorted(name for name in found if f"`{name}`" not in table)
    assert not missing, f"not in docs/environment.md: {missing}"
