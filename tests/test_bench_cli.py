"""`fastbyol bench augment` prints samples/s (and one JSON object with --json); bad options exit 2."""

import json

import pytest

from fastbyol.cli import main

pytest.importorskip("nvidia.dali")


@pytest.mark.parametrize("source", ["arrays", "jpeg"])
def test_bench_augment_json(capsys, source):
    if source == "jpeg":
        pytest.importorskip("PIL")
    assert main(["bench", "augment", "--size", "32", "--batch", "8", "--steps", "2", "--threads", "1",
                 "--source", source, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["samples_per_s"] > 0 and r["size"] == 32 and r["source"] == source


def test_bench_augment_errors(capsys):
    assert main(["bench", "augment", "--size", "2"]) == 2
    assert "--size must be >= 8" in capsys.readouterr().err
