"""Every parser of user text accepts exactly its documented forms: a --subset line, a number on the command line, an
environment count, --profile START:STOP, a brace pattern, a cache file's process id. Anything else is one line (or,
for a cache's leftovers, left alone), never an exception from int() or float() (`str.isdigit` takes '²', which int()
refuses; int() takes '٣', which no user means as a digit)."""

import argparse
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastbyol.cli import main
from fastbyol.cli.arguments import integer, number
from fastbyol.config import Config, _profile_steps
from fastbyol.data.cache import remove_stale_tmp
from fastbyol.errors import FastByolError
from fastbyol.evaluation.finetune import read_subset, subset_indices
from fastbyol.system.environment import fault_injection_count, torchrun_world

from .support import one_line

ODD = ["²", "٣", "1_0", " 1", "+1", "-1", "1e3", "0x1f", "9" * 5000, "１", "", "1.0", "nan", "\u00a0"]
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30) | st.sampled_from(ODD)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_cli_integers_are_ascii_digits_only(text):
    try:
        value = integer(text)
    except argparse.ArgumentTypeError as e:
        assert "\n" not in str(e)
        assert not re.fullmatch(r"[+-]?[0-9]+", text) or len(text) > 39
        return
    assert re.fullmatch(r"[+-]?[0-9]+", text) and value == int(text)


def _floatable(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(TEXT | st.floats(allow_nan=True).map(repr) | st.from_regex(r"\A[+-]?[0-9]{0,5}\.?[0-9]{0,5}(e[+-]?[0-9]{1,3})?\Z"))
def test_cli_numbers_are_ascii_decimals_only(text):
    """Accepted: what float() reads, written in ASCII without blanks, underscores or the word 'infinity'; every such
    text of up to 20 characters is accepted."""
    plain = text.isascii() and "_" not in text and text == text.strip() and "infinity" not in text.lower()
    try:
        value = number(text)
    except argparse.ArgumentTypeError as e:
        assert "\n" not in str(e)
        assert not (plain and _floatable(text) and len(text) <= 20), text
        return
    assert plain and _floatable(text)
    assert value == float(text) or value != value


@pytest.mark.parametrize("flag,value", [("--epochs", "٣"), ("--epochs", "²"), ("--seed", "9" * 5000),
                                        ("--base-lr", "1_0"), ("--base-lr", "０.１")])
def test_a_number_flag_in_another_form_is_one_line(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["train", flag, value])
    assert e.value.code == 2
    one_line(capsys, flag)


@settings(max_examples=200, deadline=None)
@given(st.lists(TEXT.filter(lambda t: "\n" not in t and "\r" not in t and "#" not in t), min_size=1, max_size=6))
def test_subset_lines_are_indices_only_in_ascii_digits(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("subset") / "s.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        kind, entries, _ = read_subset(path)
    except FastByolError as e:
        assert "\n" not in str(e)
        return
    if kind == "indices":
        assert all(re.fullmatch(r"[0-9]+", e) for _, e in entries)
        try:
            picked = subset_indices(path, entries, 1000)
        except FastByolError as e:
            assert "\n" not in str(e) and "not an image of the labelled train split" in str(e)
            return
        assert all(0 <= i < 1000 for i in picked)
    else:
        assert not any(re.fullmatch(r"[0-9]+", e) for _, e in entries)


def test_the_hostile_rounds_subset_line(tmp_path):
    """'²' passed str.isdigit() and then int() raised: now it is a file name, and a mixture is one line."""
    path = tmp_path / "s.txt"
    path.write_text("²\n")
    assert read_subset(path)[0] == "names"
    path.write_text("1\n²\n")
    with pytest.raises(FastByolError, match="mixes indices"):
        read_subset(path)
    path.write_bytes(b"1\n\xff\n")
    with pytest.raises(FastByolError, match="not UTF-8 text"):
        read_subset(path)


@pytest.mark.parametrize("raw", ["²", "٣", "9" * 5000, "1_0", "-1", " ", "1e3"])
def test_environment_counts(monkeypatch, raw):
    monkeypatch.setenv("WORLD_SIZE", raw)
    with pytest.raises(FastByolError, match="WORLD_SIZE"):
        torchrun_world()
    monkeypatch.setenv("FASTBYOL_TEST_SOMETHING", raw)
    assert fault_injection_count("FASTBYOL_TEST_SOMETHING") == 0


@pytest.mark.parametrize("text,ok", [("1:3", (1, 3)), (" 2 : 5 ", (2, 5)), ("²:3", None), ("٣:5", None),
                                     ("1:" + "9" * 5000, None), ("3:1", None), ("1:2:3", None)])
def test_profile_steps(text, ok):
    assert _profile_steps(text) == ok
    cfg = Config()
    cfg.run.profile = text
    if ok is None:
        with pytest.raises(FastByolError, match="--profile"):
            cfg.validate()


@pytest.mark.parametrize("pattern,why", [("d/x-{0..99999999}.tar", "more than fastbyol reads"),
                                         ("d/x-{²..3}.tar", "not a numeric range"),
                                         ("d/x-{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}.tar", "more than 100000"),
                                         ("d/" + "{a}" * 40 + ".tar", "brace groups"),
                                         ("d/x-{0..1" + "0" * 30 + "}.tar", "not a numeric range")])
def test_brace_patterns_are_bounded(tmp_path, capsys, pattern, why):
    assert main(["train", "--data", str(tmp_path / pattern), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 2
    one_line(capsys, why)


def test_cache_leftovers_of_other_forms_are_left_alone(tmp_path):
    for name in ("x.tmp-²", "x.tmp-" + "9" * 5000, "x.tmp-٣"):
        (tmp_path / name[:200]).write_text("")
    assert remove_stale_tmp(tmp_path) == 0 and len(list(tmp_path.iterdir())) == 3
