"""README.md and docs/: every `lalmtool ...` command names a real command and real options (read
from the CLI's own click commands), every relative link resolves, the README stays a landing
page."""
import glob
import os
import re
import shlex

import click
import pytest

from lalmtool.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
SEPARATORS = {"|", "||", "&&", ";", ">", "2>", ">>", "<"}


def command_lines(text: str) -> list[str]:
    """The shell lines of the code blocks (continuations joined) and the inline code spans that
    run lalmtool."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|console|)\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"(?<!`)`(lalmtool [^`]+)`", text)
    return [line for line in lines if re.search(r"(^|[\s|;&(])lalmtool\s", line)]


def invocations(line: str) -> list[list[str]]:
    """The argument lists given to lalmtool on one line."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    out = []
    for i, word in enumerate(words):
        if word == "lalmtool" or word.endswith("/lalmtool") or word == "lalmtool.cli":
            args = []
            for w in words[i + 1:]:
                if w in SEPARATORS:
                    break
                args.append(w)
            out.append(args)
    return out


def check(args: list[str], where: str) -> list[str]:
    """What is wrong with ``lalmtool ARGS`` (empty: nothing)."""
    cmd, name = main, "lalmtool"
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        if args[0] not in cmd.commands:
            if args[0].startswith(("<", "$", "COMMAND", "...")) or "|" in args[0]:
                return []
            return [f"{where}: `{name} {args[0]}` is not a command"]
        name += " " + args[0]
        cmd, args = cmd.commands[args[0]], args[1:]
    params = cmd.get_params(click.Context(cmd, info_name=name))
    opts = {o for p in params for o in (*p.opts, *p.secondary_opts)}
    wrong = []
    for word in args:
        if not word.startswith("--") or word in ("--",):
            continue
        key = word.split("=", 1)[0]
        if key in opts:
            continue
        if name in ("lalmtool finetune", "lalmtool align") and \
                "--" + key[2:].replace("_", "-") in opts:  # --max_steps=300: a training option
            continue
        wrong.append(f"{where}: `{name}` has no option {key}")
    return wrong


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_lalmtool_command_in_the_docs_names_real_options(page):
    text = open(page, encoding="utf-8").read()
    wrong = []
    for line in command_lines(text):
        for args in invocations(line):
            wrong += check(list(args), f"{os.path.relpath(page, ROOT)}: {line.strip()[:60]}")
    assert wrong == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
    text = open(page, encoding="utf-8").read()
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        if not os.path.exists(os.path.join(os.path.dirname(page), target)):
            missing.append(target)
    assert missing == []


def test_the_readme_is_a_landing_page():
    text = open(PAGES[0], encoding="utf-8").read()
    lines = text.splitlines()
    assert len(lines) <= 200
    assert lines[3] == ("./install.sh && bash recipes/mini/run.sh      # main job: the offline mini "
                        "recipe, real Whisper tiny.en")
    assert lines[4].startswith("./install.sh && python3 -m pytest -q")
    linked = set(re.findall(r"\(docs/([^)]+)\)", text))
    assert linked == {os.path.basename(p) for p in PAGES[1:]}  # every page reachable


def test_a_wrong_option_is_found():  # the check itself can fail
    assert check(["decode", "--feats", "x", "--beams", "2"], "here") == [
        "here: `lalmtool decode` has no option --beams"]
    assert check(["finetune", "--max_steps=3", "--lr", "1"], "here") == []
    assert check(["segmnt"], "here") == ["here: `lalmtool segmnt` is not a command"]


def test_the_architecture_page_shows_the_floors_of_the_code():
    from lalmtool.floors import diagram

    text = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
    shown = re.search(r"<!-- floors: python3 -m lalmtool.floors -->\n```\n(.*?)```", text, re.S)
    assert shown.group(1) == diagram() + "\n", "run python3 -m lalmtool.floors and paste it"


def test_floors_follow_load_time_imports_and_align_reads_eight_modules():
    from lalmtool.floors import PACKAGE, floors, imports, modules

    known = set(modules())
    assert imports("align", os.path.join(PACKAGE, "align.py"), known) == {
        "trained", "trainer", "ctc", "examples", "fileio", "models", "options", "parallel"}
    assert imports("models.whisper", os.path.join(PACKAGE, "models", "whisper.py"), known) == {
        "options", "models.base"}  # ``..options`` and ``.base`` from inside models/
    assert imports("corpora.librispeech", os.path.join(PACKAGE, "corpora", "librispeech.py"),
                   known) == {"corpora"}  # ``from . import name``: the package's __init__
    f = floors()
    assert f["fileio"] == 0 and f["align"] == 1 + max(f[m] for m in imports(
        "align", os.path.join(PACKAGE, "align.py"), known))
