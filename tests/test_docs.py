"""The documentation stays true. In README.md, docs/*.md and benchmarks/results/*/README.md:
- every relative link resolves (the file, and the `#anchor` as GitHub slugs a heading), inside the repository;
- every `fastbyol ...` command shown in a shell block or an inline code span uses a subcommand and flags that the real
  argparse parser (`fastbyol.cli._build_parser()`) has, with values inside a flag's closed set where it has one;
- every repository path named in a code span, or run as a script, exists.
The checks are functions of the text, so the tests also feed them planted mistakes and check each is caught.

    .venv/bin/python -m pytest tests/test_docs.py -q
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from pathlib import Path


from fastbyol.cli import _build_parser
from fastbyol.config import SECTIONS, allowed_values

ROOT = Path(__file__).resolve().parents[1]


# a fenced code block; its info "bash" (sh, shell, console) or none marks a shell block
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)(?P<info>[^\n]*)\n"
                   r"(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$", re.M | re.S)
SHELL_INFO = {"bash", "sh", "shell", "console", "shell-session"}
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
REF_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(?P<target>\S+)", re.M)
CODE_SPAN = re.compile(r"(`+)(?P<code>.+?)\1", re.S)
SHELL_STOP = {"|", "||", "&&", ";", ";;", "&", ">", ">>", ">&", "<", "(", ")", "$("}


def doc_files() -> list[Path]:
    """The checked pages: README.md, every docs/*.md and every benchmarks/results/*/README.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "benchmarks" / "results").glob("*/README.md"))]


# ---------------------------------------------------------------------------------------------------------- links

# a 4-space indented code block starts after a blank line (an indented line right after text continues a list item)
INDENTED = re.compile(r"(?:(?<=\n\n)|\A)(?:(?: {4}|\t)[^\n]*\n)+")


def strip_blocks(text: str) -> str:
    """The text without fenced and 4-space indented code blocks."""
    return INDENTED.sub("", FENCE.sub("", text))


def strip_code(text: str) -> str:
    """The text without code blocks and code spans (links inside code are not links)."""
    return CODE_SPAN.sub("", strip_blocks(text))


def github_slugs(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text: lower case, punctuation dropped (letters, digits,
    '-', '_' and spaces kept), spaces to '-', a repeated slug numbered -1, -2, ..."""
    slugs: set[str] = set()
    counts: dict[str, int] = {}
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link in a heading keeps its text
        heading = re.sub(r"<[^>]+>", "", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def link_problems(text: str, page: Path, root: Path = ROOT) -> list[str]:
    """'page: target (why)' for every relative link of `text` (the content of `page`) that does not resolve inside
    `root`, or whose #anchor is not a heading of its target."""
    problems = []
    prose = strip_code(text)
    targets = [m.group("target").strip("<>") for m in LINK.finditer(prose)]
    targets += [m.group("target") for m in REF_LINK.finditer(prose)]
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page.resolve()
        where = f"{page.relative_to(root) if page.is_relative_to(root) else page.name}: {target}"
        if not dest.is_relative_to(root.resolve()):
            problems.append(f"{where} (outside the repository)")
        elif not dest.exists():
            problems.append(f"{where} (no such file)")
        elif anchor:
            if dest.suffix != ".md" or dest.is_dir():
                problems.append(f"{where} (an anchor into a file that is not markdown)")
            elif anchor not in github_slugs(dest.read_text() if path_part else text):
                problems.append(f"{where} (no heading with this anchor)")
    return problems


REPO_PATH = re.compile(r"(?:fastbyol|kernels|benchmarks|tests|docs)/[\w./*-]*")


def path_problems(text: str, root: Path = ROOT) -> list[str]:
    """Repository paths named in code spans (`tests/test_x.py`, `benchmarks/`, a glob such as `tests/test_data_*.py`)
    or run as scripts in shell blocks (`python benchmarks/x.py`) that do not exist: a renamed file leaves no stale
    name behind."""
    named = [m.group("code") for m in CODE_SPAN.finditer(strip_blocks(text))]
    named = [c for c in named if REPO_PATH.fullmatch(c)]
    for line in shell_commands(text):
        named += [t for t in line.split() if REPO_PATH.fullmatch(t) and t.endswith((".py", ".sh"))]
    return sorted({n for n in named if not (any(root.glob(n)) if "*" in n else (root / n).exists())})


# -------------------------------------------------------------------------------------------------------- commands

def shell_commands(text: str) -> list[str]:
    """Command lines of the shell blocks (fenced bash/sh/console or untagged, and 4-space indented blocks), joined
    over trailing backslashes, plus the inline code spans that start with `fastbyol `."""
    blocks = [m.group("body") for m in FENCE.finditer(text)
              if (m.group("info").strip().split() or [""])[0].lower() in SHELL_INFO | {""}]
    blocks += [re.sub(r"^(?: {4}|\t)", "", m.group(0), flags=re.M) for m in INDENTED.finditer(FENCE.sub("", text))]
    lines = []
    for block in blocks:
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    inline = [m.group("code").replace("\n", " ") for m in CODE_SPAN.finditer(strip_blocks(text))]
    return lines + [code for code in inline if code.startswith("fastbyol ")]


def fastbyol_invocations(line: str) -> list[list[str]]:
    """The argument lists after each `fastbyol` (a path ending in it, or `-m fastbyol`) on a shell line, each cut at
    the first pipe, redirection or command separator."""
    # `cpu|gpu` (no spaces) shows alternatives, not a pipe: keep it one word
    line = re.sub(r"(?<=[\w\]])\|(?=[\w\[-])", "\x00", line.removeprefix("$ "))
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True  # `;`, `|`, `&`, `<`, `>`, `(`, `)` still split off as their own tokens
    try:
        tokens = [t.replace("\x00", "|") for t in lexer]
    except ValueError:  # an unclosed quote: a prose fragment, not a command
        return []
    found = []
    for i, tok in enumerate(tokens):
        # `fastbyol` or `.venv/bin/fastbyol` where a command starts, or `python -m fastbyol`; not the word as an
        # argument (`--systems fastbyol lightly`, `pip install fastbyol`)
        before = [t for t in tokens[:i] if not re.fullmatch(r"[A-Za-z_]\w*=\S*", t)]  # VAR=value prefixes
        at_start = not before or before[-1] in SHELL_STOP | {"-m", "time", "nohup", "exec", "env"}
        if tok.rsplit("/", 1)[-1] != "fastbyol" or not at_start:
            continue
        args = []
        for t in tokens[i + 1:]:
            if t in SHELL_STOP:
                break
            args.append(t)
        found.append(args)
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def flag_problems(args: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(command, flag) for the subcommand or each flag of one `fastbyol` argument list that the parser lacks;
    placeholders such as `[--seed S]`, `...` and `NAME` are read as the flags or values they stand for."""
    if not args:
        return []
    path, current = [], parser
    rest = list(args)
    while rest and _subparsers(current):
        name = rest[0].strip("[]")
        if name == "..." or name.isupper():  # `fastbyol ...`, `fastbyol COMMAND`: any command
            return []
        if name.startswith("-"):
            break
        subs = _subparsers(current)
        if name not in subs:
            return [(" ".join(path) or "fastbyol", name)]
        path.append(name)
        current = subs[name]
        rest = rest[1:]
    known = current._option_string_actions
    cmd = " ".join(path) or "fastbyol"
    problems = []
    for i, tok in enumerate(rest):
        for piece in re.split(r"[\[\]|]", tok):  # "[--init", "trained|random]", "[--a|--b]"
            flag, eq, inline_value = piece.partition("=")
            if not flag.startswith("-") or flag in {"-", "--"} or re.fullmatch(r"-\d[\d.e+-]*", flag):
                continue
            if flag not in known:
                problems.append((cmd, flag))
                continue
            value = inline_value if eq else (rest[i + 1] if i + 1 < len(rest) and known[flag].nargs is None else "")
            problems += [(cmd, f"{flag} {v}") for v in bad_values(known[flag], value)]
    return problems


def bad_values(action: argparse.Action, value: str) -> list[str]:
    """The literal values shown for a flag with a closed set of values (argparse's choices, or the config rule of a
    `fastbyol train` setting) that are not in the set; placeholders (`MODE`, `$X`, `...`) are not checked."""
    allowed = action.choices
    if allowed is None and "." in (action.dest or ""):
        section, name = action.dest.split(".", 1)
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])} if section in SECTIONS else {}
        allowed = allowed_values(fields[name]) if name in fields else None
    if not allowed or not value or value.startswith("-"):
        return []
    from fastbyol.models.names import is_custom_arch

    pieces = [v for v in re.split(r"[\[\]|]", value) if v]
    own = action.dest == "model.arch"  # --arch module:factory: an encoder of the user's own
    return [v for v in pieces if not (v.isupper() or v[0] in "$<{" or v == "..." or own and is_custom_arch(v))
            and v not in allowed]


def command_problems(text: str, parser: argparse.ArgumentParser | None = None) -> list[tuple[str, str]]:
    parser = parser or _build_parser()
    problems = []
    for line in shell_commands(text):
        for args in fastbyol_invocations(line):
            problems += flag_problems(args, parser)
    return problems


# ----------------------------------------------------------------------------------------------------------- tests

def test_every_relative_link_resolves():
    problems = [p for page in doc_files() for p in link_problems(page.read_text(), page)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_shown_command_has_its_flags():
    parser = _build_parser()
    problems = [(page.relative_to(ROOT).as_posix(), cmd, flag) for page in doc_files()
                for cmd, flag in command_problems(page.read_text(), parser)]
    assert not problems, f"commands with flags `--help` does not list: {problems}"


def test_every_named_repository_path_exists():
    problems = [f"{page.relative_to(ROOT)}: {p}" for page in doc_files() for p in path_problems(page.read_text())]
    assert not problems, "paths that do not exist:\n" + "\n".join(problems)


def test_the_path_check_catches_planted_mistakes():
    text = ("`tests/test_docs.py`, `tests/test_do*.py`, `benchmarks/`, `fastbyol.kernels`, `runs/x.json`\n"
            "`tests/test_gone.py`, `tests/test_nothing_*.py`, `fastbyol/augment_old.py`\n\n"
            "```bash\npython benchmarks/parity.py --seeds 0\n"
            "python benchmarks/no_such_script.py > runs/out.json\n```\n")
    assert path_problems(text) == sorted(["tests/test_gone.py", "tests/test_nothing_*.py", "fastbyol/augment_old.py",
                                          "benchmarks/no_such_script.py"])


def test_the_pages_exist_and_are_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    index = (ROOT / "docs" / "index.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"({page.name}" in index or page.name == "index.md", f"docs/index.md does not link {page.name}"
    assert "(docs/index.md)" in readme


def test_the_link_check_catches_planted_mistakes(tmp_path):
    (tmp_path / "docs").mkdir()
    other = tmp_path / "docs" / "other.md"
    other.write_text("# Other page\n\n## The `--data` flag, again!\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "docs" / "page.md"
    text = ("# Page\n\nsee [ok](other.md), [anchor](other.md#the---data-flag-again), [dup](other.md#twice-1),\n"
            "[self](#page), [web](https://example.org/x.md), ![img](missing.png), [gone](nope.md),\n"
            "[bad anchor](other.md#no-such-heading), [out](../../etc/passwd), [self bad](#nowhere)\n\n"
            "```bash\ncat [in code](also-missing.md)\n```\n\n    [indented code](missing-too.md)\n\n"
            "- a list item whose second line\n    links [a page](list-missing.md)\n\n[ref]: ref-missing.md\n")
    page.write_text(text)
    problems = link_problems(text, page, tmp_path)
    bad = sorted(p.split(": ", 1)[1].split(" (")[0] for p in problems)
    assert bad == sorted(["missing.png", "nope.md", "other.md#no-such-heading", "../../etc/passwd", "#nowhere",
                          "ref-missing.md", "list-missing.md"]), problems
    assert any("outside the repository" in p for p in problems)


def test_the_flag_check_catches_planted_mistakes():
    parser = _build_parser()
    good = ("```bash\n.venv/bin/fastbyol train --epochs 1 --out /tmp/x --data=synthetic  # a comment --nope\n"
            "fastbyol train [--preset NAME] [--seed S] ...\n"
            "torchrun --standalone --nproc_per_node 2 -m fastbyol train --resume RUN \\\n    --no-progress\n"
            "fastbyol eval RUN --init trained|random | tee log --whatever\n"
            "fastbyol bench augment --size 224 --device cpu|gpu --json\n"
            "python benchmarks/parity.py --systems fastbyol lightly --seeds 0 1\n"
            "FASTBYOL_KERNELS=reference .venv/bin/fastbyol train --seed 3; python -m fastbyol ...  # any\n```\n"
            "Placeholders: `fastbyol COMMAND --help`.\n"
            "Inline: `fastbyol export RUN --out e.pt --which target`.\n")
    assert command_problems(good, parser) == []
    bad = ("```bash\nfastbyol train --epochs 1 --no-such-flag 3\n"
           "fastbyol bench augment --batch 8 \\\n    --decode-mode once\n"
           "python -m fastbyol frobnicate --x\n```\n\n"
           "    fastbyol eval RUN [--inti random]\n\n"
           "Inline: `fastbyol export RUN --format onnx`.\n")
    assert sorted(command_problems(bad, parser)) == sorted([
        ("train", "--no-such-flag"), ("bench augment", "--decode-mode"), ("fastbyol", "frobnicate"),
        ("eval", "--inti"), ("export", "--format")])
    # a value outside a flag's closed set: argparse choices, and a train setting's rule
    values = ("```bash\nfastbyol train --compile reduce-overhead --arch resnet50 --stem MODE\n"
              "fastbyol train --compile turbo --device=tpu\nfastbyol bench augment --device cpu|tpu\n```\n")
    assert sorted(command_problems(values, parser)) == sorted([
        ("train", "--compile turbo"), ("train", "--device tpu"), ("bench augment", "--device tpu")])
    # an abbreviation argparse would accept is not the flag's name: the docs must spell it out
    assert command_problems("```bash\nfastbyol train --epoch 2\n```\n", parser) == [("train", "--epoch")]


def code_map(index: str) -> str:
    """The code map of docs/index.md: the text block after its "Where the code is" line."""
    after = index.split("Where the code is", 1)[1]
    return after.split("```text", 1)[1].split("```", 1)[0]


def unmapped_modules(text: str, root: Path = ROOT) -> list[str]:
    """The project's modules (fastbyol/**.py, kernels/*.py) whose path, relative to its top folder's map entry, the
    code map does not name: `train.py`, `run/files.py`, `kernels/ema.py`..."""
    missing = []
    for top, prefix in (("fastbyol", ""), ("kernels", "kernels/")):
        for path in sorted((root / top).rglob("*.py")):
            name = prefix + path.relative_to(root / top).as_posix()
            if name.endswith("__init__.py") or name.endswith("__main__.py"):
                continue
            if not re.search(rf"(?<![\w/]){re.escape(name)}\b", text):
                missing.append(name)
    return missing


def test_the_code_map_names_every_module():
    missing = unmapped_modules(code_map((ROOT / "docs" / "index.md").read_text()))
    assert not missing, f"docs/index.md's code map does not name: {missing}"


def test_the_code_map_check_catches_a_planted_module(tmp_path):
    (tmp_path / "fastbyol" / "run").mkdir(parents=True)
    (tmp_path / "kernels").mkdir()
    for name in ("fastbyol/train.py", "fastbyol/run/files.py", "fastbyol/run/new.py", "kernels/ema.py"):
        (tmp_path / name).write_text("")
    text = "train.py   the trainer\nrun/files.py   the run files\nkernels/ema.py  the EMA\nfiles.py\n"
    assert unmapped_modules(text, tmp_path) == ["run/new.py"]


# ----------------------------------------------------------------------------------- figures the code knows

def generated_block(text: str, name: str) -> str:
    """The text between <!-- NAME:start --> and <!-- NAME:end --> (stripped)."""
    m = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert m, f"no {name} block"
    return m.group(1).strip()


def test_the_preset_table_is_the_codes():
    from fastbyol.cli import preset_table
    from fastbyol.config import PRESETS

    text = (ROOT / "docs" / "cli.md").read_text()
    assert generated_block(text, "presets") == preset_table(), "docs/cli.md: run `fastbyol presets --markdown`"
    assert all(f"`{name}`" in preset_table() for name in PRESETS)


def test_the_plan_table_is_the_codes():
    from fastbyol.tools.plan import plan_table

    text = (ROOT / "docs" / "planning.md").read_text()
    assert generated_block(text, "plan-table") == plan_table(), "docs/planning.md: run `fastbyol plan --table`"


def test_a_drifted_table_is_caught():
    text = "x\n<!-- presets:start -->\n| a |\n<!-- presets:end -->\n"
    assert generated_block(text, "presets") == "| a |"
    from fastbyol.cli import preset_table

    assert generated_block(text, "presets") != preset_table()


def test_the_operator_counts_are_the_graphs(tmp_path):
    """docs/recipe.md's operator counts are the DALI graphs' (CPU: arrays, encoded files)."""
    import numpy as np
    import pytest

    pytest.importorskip("nvidia.dali")
    pytest.importorskip("PIL")
    from fastbyol.augment import LoaderSettings, TwoViewLoader
    from fastbyol.data.folders import FileList
    from fastbyol.data.synthetic import write_synthetic_jpegs

    arrays = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    root = write_synthetic_jpegs(tmp_path / "j", n_train=16, n_test=0, size=32, classes=1)
    files = FileList(sorted(str(p) for p in (root / "train").rglob("*.jpg")), None)
    counts = [TwoViewLoader(src, LoaderSettings(8, 16, num_threads=1)).operators for src in (arrays, files)]
    text = " ".join((ROOT / "docs" / "recipe.md").read_text().split())
    assert f"{counts[0]} operators on the CPU from arrays and {counts[1]} from encoded files" in text, counts


def test_the_image_counts_are_the_datas():
    from fastbyol.data import load_embedded

    ds = load_embedded()
    n_train, n_test = len(ds.train_images), len(ds.test_images)
    readme = " ".join((ROOT / "README.md").read_text().split())
    data = " ".join((ROOT / "docs" / "data.md").read_text().split())
    assert f"{n_train:,} Fashion-MNIST images" in readme
    assert f"{n_train:,} images for pretraining and the kNN memory bank, {n_test:,} held out" in data


def test_the_readmes_next_steps_use_the_run_directory_make_train_prints():
    """The RUN= line names a folder of the form the default run gets (runs/DATA-PRESET-UTCTIME), and make train
    is still the default preset on the default data."""
    from datetime import datetime

    from fastbyol.config import DEFAULT_PRESET, get_preset
    from fastbyol.run.naming import default_run_name

    block = (ROOT / "README.md").read_text().split("From `make train` to a backbone and a picture:", 1)[1]
    run = re.search(r"^RUN=(\S+)", block, re.M).group(1)
    stamp = datetime.strptime(run.rsplit("-", 2)[-2] + run.rsplit("-", 2)[-1], "%Y%m%d%H%M%S")
    assert run == "runs/" + default_run_name(get_preset(DEFAULT_PRESET).data.data, DEFAULT_PRESET, stamp)
    assert f"summary: {run}/summary.json" in block and "ls -d" not in block
    makefile = (ROOT / "Makefile").read_text()
    assert "$(VENV)/bin/fastbyol train\n" in makefile  # make train: the default preset and data
