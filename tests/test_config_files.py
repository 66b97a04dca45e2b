"""Config files (`fastbyol train --config FILE`, `--print-config`): a YAML file gives the run the flags give, a run's
config.json is a template, what --print-config writes reads back to the same settings, and every bad key or value is
one line naming the file and the key."""

import json

import pytest

from fastbyol.cli import _build_parser, config_from_args, main
from fastbyol.config import Config, config_from_file, config_yaml, get_preset


def _cfg(*argv: str) -> Config:
    return config_from_args(_build_parser().parse_args(["train", *argv]))


def test_a_yaml_file_gives_the_settings_the_flags_give(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: cifar10-resnet18\nbatch_size: 256   # flat\n"
                                       "optim:\n  weight_decay: 1e-5     # YAML 1.1 reads this as a string\n"
                                       "  epochs: 7\nrun: {seed: 3}\n")
    from_file = _cfg("--config", str(tmp_path / "run.yaml"))
    from_flags = _cfg("--preset", "cifar10-resnet18", "--batch-size", "256", "--weight-decay", "1e-5",
                      "--epochs", "7", "--seed", "3")
    assert from_file == from_flags
    assert from_file.optim.weight_decay == 1e-5 and from_file.model.arch == "resnet18"  # the rest: the preset's


def test_flags_override_the_file_and_preset_flag_wins(tmp_path):
    (tmp_path / "f.yaml").write_text("preset: cifar10-resnet18\ndata: {batch_size: 256}\n")
    cfg = _cfg("--config", str(tmp_path / "f.yaml"), "--batch-size", "64")
    assert cfg.data.batch_size == 64 and cfg.preset == "cifar10-resnet18"
    cfg = _cfg("--config", str(tmp_path / "f.yaml"), "--preset", "stl10-resnet18")
    assert cfg.preset == "stl10-resnet18" and cfg.data.image_size == 96 and cfg.data.batch_size == 256


def test_print_config_reads_back_to_the_same_settings(tmp_path, capsys):
    assert main(["train", "--preset", "stl10-resnet18", "--epochs", "3", "--base-lr", "0.5", "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "p.yaml").write_text(text)
    assert config_from_file(tmp_path / "p.yaml") == _cfg("--preset", "stl10-resnet18", "--epochs", "3",
                                                          "--base-lr", "0.5")
    assert main(["train", "--config", str(tmp_path / "p.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == text  # round trip, byte for byte
    assert not (tmp_path / "runs").exists()


def test_a_runs_config_json_is_a_template(tmp_path):
    cfg = get_preset("cifar10-resnet18")
    cfg.run.out, cfg.run.name, cfg.optim.epochs = str(tmp_path / "old"), "old", 5
    saved = {"run_id": "0123456789abcdef0123456789abcdef", **cfg.to_dict(), "resolved": {"local_batch": 512}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = config_from_file(tmp_path / "config.json")
    assert loaded.optim.epochs == 5 and loaded.run.out == "" and loaded.run.name == ""  # a new run, a new folder
    cfg.run.out = cfg.run.name = ""
    assert loaded == cfg
    assert Config.from_dict(saved).run.out == str(tmp_path / "old")  # the file still resumes its own run
    (tmp_path / "again.yaml").write_text(config_yaml(loaded))
    assert config_from_file(tmp_path / "again.yaml") == loaded


@pytest.mark.parametrize("text, needle", [
    ("batchsize: 3\n", "unknown setting 'batchsize' (did you mean batch_size?)"),
    ("data: {batch_sise: 3}\n", "unknown setting 'data.batch_sise' (did you mean data.batch_size?)"),
    ("data: {batch_size: 3.5}\n", "data.batch_size must be int, got 3.5"),
    ("optim: {base_lr: fast}\n", "optim.base_lr must be float, got 'fast'"),
    ("online_probe: 1\n", "run.online_probe must be bool, got 1"),
    ("model: {arch: nope}\n", "model.arch must be one of"),
    ("data: {image_size: 2}\n", "data.image_size must be >= 8"),
    ("optim: 3\n", "'optim' must be a mapping of its settings"),
    ("preset: nope\n", "preset 'nope' is not one of"),
    ("- a\n- b\n", "expected settings as a mapping"),
    ("epochs: [1\n", "line 2: not valid YAML"),
])
def test_a_bad_file_is_one_line_naming_the_key(tmp_path, capsys, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and needle in err, err
    assert not (tmp_path / "run").exists()


def test_a_missing_file_and_resume_with_config(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read it" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--config", str(tmp_path / "none.yaml")]) == 2
    assert "takes no settings (got --config)" in capsys.readouterr().err


def test_a_run_from_a_yaml_file_equals_the_run_from_flags(small_idx_data, tmp_path):
    data = small_idx_data(192, 64)
    flags = ["--data", str(data), "--epochs", "1", "--batch-size", "64", "--image-size", "16", "--knn-every", "0",
             "--proj-hidden", "64", "--pred-hidden", "64", "--seed", "5"]
    assert main(["train", *flags, "--out", str(tmp_path / "flags"), "--no-progress"]) == 0
    (tmp_path / "run.yaml").write_text(f"data:\n  data: {data}\n  batch_size: 64\n  image_size: 16\n"
                                       "model: {proj_hidden: 64, pred_hidden: 64}\n"
                                       "optim: {epochs: 1}\nrun: {knn_every: 0, seed: 5}\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "yaml"),
                 "--no-progress"]) == 0
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("flags", "yaml"))
    assert a["params_sha256"] == b["params_sha256"] and a["steps"] == 3
    ca, cb = (json.loads((tmp_path / r / "config.json").read_text()) for r in ("flags", "yaml"))
    ca["run"]["out"] = cb["run"]["out"] = ""
    assert ca.pop("run_id") != cb.pop("run_id")  # every run its own id
    assert ca == cb
