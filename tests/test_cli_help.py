"""Every subcommand's --help as argparse prints it: no literal "%%" (a description is %-formatted only when it holds
%(prog)s, an option's help always is) and no option whose help says "(default: ...)" twice (the defaults formatter
appends one to a help that already states its default)."""

import argparse
import re

from fastbyol.cli import _build_parser


def _parsers(parser: argparse.ArgumentParser, name: str = "fastbyol"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _option_helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help as printed (%-expanded, the formatter's default appended), whitespace folded."""
    formatter = parser._get_formatter()
    return {"/".join(a.option_strings) or a.dest: " ".join(formatter._expand_help(a).split())
            for a in parser._actions if a.help and a.help != argparse.SUPPRESS}


def test_every_subcommand_is_scanned():
    names = {name for name, _ in _parsers(_build_parser())}
    assert {"fastbyol train", "fastbyol eval", "fastbyol finetune", "fastbyol bench augment", "fastbyol export",
            "fastbyol plot", "fastbyol shards", "fastbyol presets"} <= names


def test_no_literal_double_percent_in_any_help():
    bad = [name for name, parser in _parsers(_build_parser()) if "%%" in parser.format_help()]
    assert not bad, f"'%%' printed literally in: {bad}"


def test_no_option_says_its_default_twice():
    twice = [f"{name} {flag}: {text}" for name, parser in _parsers(_build_parser())
             for flag, text in _option_helps(parser).items() if len(re.findall(r"\(default[:s]", text)) > 1]
    assert not twice, "\n".join(twice)


def test_finetune_help_reads_as_written():
    parser = dict(_parsers(_build_parser()))["fastbyol finetune"]
    text = " ".join(parser.format_help().split())
    assert "1% and 10% of the labels" in text
    helps = _option_helps(parser)
    assert helps["--batch-size"].count("(default:") == 1 and "(default: 1024" in helps["--batch-size"]
    assert helps["--epochs"].endswith("(default: 80)")  # an option without its own note still gets argparse's


def test_help_and_presets_import_no_torch():
    """`fastbyol --help`, `train --help` and `presets` answer without importing torch (the wait: under a second,
    benchmarks/test_bench_cli.py)."""
    import subprocess
    import sys

    code = ("import sys\nfrom fastbyol.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['plan', '--help'], ['presets']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('torch', 'nvidia.dali', 'triton', 'yaml') if m in sys.modules)\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stderr, out.stderr[-2000:]
