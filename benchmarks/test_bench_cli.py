"""pytest-benchmark of the command line's start: `fastbyol --help`, `fastbyol train --help` and `fastbyol presets`,
each in a fresh interpreter (the wait a user sees), beside `python -c pass` (the interpreter alone). The goal is under
a second each; these paths import no torch (`tests/test_cli_help.py` checks that, untimed).

    .venv/bin/python -m pytest benchmarks/test_bench_cli.py -q --benchmark-columns=median,rounds
"""

import subprocess
import sys

import pytest

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "fastbyol --help": [sys.executable, "-m", "fastbyol", "--help"],
    "fastbyol train --help": [sys.executable, "-m", "fastbyol", "train", "--help"],
    "fastbyol presets": [sys.executable, "-m", "fastbyol", "presets"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_cli_start(benchmark, name):
    def run():
        subprocess.run(COMMANDS[name], check=True, stdout=subprocess.DEVNULL)

    benchmark.extra_info["command"] = name
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
