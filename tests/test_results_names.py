"""Results never overwrite or mislabel each other: each file is named by everything that makes its figure different
(protocol, fraction or subset file and its digest, data, settings, init), records that key, and the table pairs a
trained figure only with the random-init figure of the same key."""

import json

import pytest

from fastbyol.cli import main
from fastbyol.evaluation.commands import EvalSettings
from fastbyol.evaluation.finetune import FINETUNE_BASE_LR, FINETUNE_EPOCHS
from fastbyol.evaluation.paper import PAPER_EPOCHS
from fastbyol.evaluation.results import ResultKey, format_table, subset_tag, table_rows, write_result

from .support import one_step_run


def test_the_settings_defaults_are_the_protocols_own():
    assert EvalSettings().epochs == PAPER_EPOCHS == FINETUNE_EPOCHS and EvalSettings().lr == FINETUNE_BASE_LR
    assert EvalSettings().differing("paper") == () and EvalSettings(epochs=3).differing("features") == ()
    assert EvalSettings(epochs=3, lr=0.02).differing("finetune") == (("epochs", 3), ("lr", 0.02))


def test_every_difference_gives_another_name(tmp_path):
    subset = tmp_path / "0.5.txt"
    subset.write_text("0\n1\n")
    keys = [ResultKey("finetune", "0.5"), ResultKey("finetune", subset_tag(subset, subset.read_bytes())),
            ResultKey("finetune", "0.5", init="random"), ResultKey("finetune", "0.5", data="/other/data"),
            ResultKey("finetune", "0.5", settings=(("epochs", 3),)), ResultKey("features"), ResultKey("paper"),
            ResultKey("features", data="/other/data"), ResultKey("features", settings=(("probe_epochs", 5),))]
    names = [k.file_name() for k in keys]
    assert len(set(names)) == len(names), names
    assert names[0] == "finetune-0.5.json" and names[5] == "eval-features.json"
    edited = tmp_path / "edited" / "0.5.txt"  # the same name, other contents: another result
    edited.parent.mkdir()
    edited.write_text("0\n2\n")
    assert subset_tag(edited, edited.read_bytes()) != subset_tag(subset, subset.read_bytes())
    odd = tmp_path / ("x" * 200 + "\udcff.txt")
    assert len(ResultKey("finetune", subset_tag(odd, b"0\n"), data="/d", init="random",
                         settings=(("epochs", 3), ("lr", 0.02), ("batch_size", 64))).file_name().encode()) < 255


def test_the_table_pairs_only_figures_of_one_key(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    half = tmp_path / "0.5.txt"
    half.write_text("3\n4\n")
    write_result(run, ResultKey("finetune", "0.5"), {"top1": 60.0})
    write_result(run, ResultKey("finetune", "0.5", init="random"), {"top1": 40.0})
    write_result(run, ResultKey("finetune", subset_tag(half, half.read_bytes())), {"top1": 55.0})
    write_result(run, ResultKey("features", data=str(tmp_path / "other")), {"knn_top1": 70.0, "linear_top1": 71.0})
    write_result(run, ResultKey("features", init="random"), {"knn_top1": 20.0, "linear_top1": 21.0})
    rows = {label: (trained, random) for label, trained, random in table_rows(run)}
    assert rows["fine-tune 50% labels"] == (60.0, 40.0)
    assert rows[f"fine-tune subset 0.5 ({subset_tag(half, half.read_bytes()).rsplit('-', 1)[1]})"] == (55.0, None)
    assert rows["kNN (features) [data other]"] == (70.0, None)  # never paired with the own data's random init
    assert rows["kNN (features)"] == (None, 20.0)
    assert len(format_table(table_rows(run))) == 1 + len(rows)


def test_old_result_files_keep_their_rows_and_a_renamed_file_is_left_out(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval-features.json").write_text(json.dumps({"knn_top1": 50.0, "linear_top1": 52.0}))  # no key: old
    (run / "finetune-0.1-random.json").write_text(json.dumps({"top1": 30.0}))
    (run / "finetune-nan.json").write_text(json.dumps({"top1": 99.0}))  # not a fraction: no row
    write_result(run, ResultKey("finetune", "0.1"), {"top1": 45.0})
    (run / "finetune-0.1.json").rename(run / "finetune-0.2.json")  # its key says 0.1: not trusted for 0.2
    rows = {label: (trained, random) for label, trained, random in table_rows(run)}
    assert rows == {"kNN (features)": (50.0, None), "linear (features)": (52.0, None),
                    "fine-tune 10% labels": (None, 30.0)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return one_step_run(tmp_path_factory.mktemp("runs") / "run")


def test_a_fraction_and_a_subset_file_of_the_same_name_keep_both_results(finished, tmp_path, capsys):
    """The hostile round's example: `--fraction F` then `--subset F.txt` replaced the first result, still labelled
    as the fraction."""
    subset = tmp_path / "0.01.txt"
    subset.write_text("\n".join(str(i) for i in range(0, 8000, 100)) + "\n")
    common = ["--epochs", "1", "--batch-size", "16", "--no-progress"]
    assert main(["finetune", str(finished), "--fraction", "0.01", *common]) == 0
    assert main(["finetune", str(finished), "--subset", str(subset), *common]) == 0
    tag = subset_tag(subset, subset.read_bytes())
    by_fraction = json.loads((finished / "finetune-0.01-epochs1-batch_size16.json").read_text())
    by_file = json.loads((finished / f"finetune-{tag}-epochs1-batch_size16.json").read_text())
    assert by_fraction["fraction"] == 0.01 and by_file["subset_file"] == str(subset)
    assert by_fraction["key"]["subset"] == "0.01" and by_file["key"]["subset"] == tag
    out = capsys.readouterr().out
    assert "fine-tune 1% labels [epochs 1, batch_size 16]" in out
    assert f"fine-tune subset 0.01 ({tag.rsplit('-', 1)[1]}) [epochs 1, batch_size 16]" in out
