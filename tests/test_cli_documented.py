"""Every `livesr ...` command line in README.md and docs/ still parses (backwards-compatible
flags), and building the CLI imports neither torch nor Qt."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from realtime import cli, cli_tools

REPO = Path(__file__).resolve().parents[1]


def documented_command_lines() -> list[list[str]]:
    """`livesr ...` lines of the code blocks (continuations joined, comments dropped)."""
    lines: list[list[str]] = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        in_block, pending = False, ""
        for raw in doc.read_text().splitlines():
            if raw.lstrip().startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            text = pending + raw.split(" #")[0].strip()
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            if text.startswith("livesr "):
                lines.append(shlex.split(text.replace('"$CFG"', "x.cfg"))[1:])
    return lines


def parse_only(argv: list[str]) -> None:
    """Parse ARGV with the `livesr` app without running the command (click's own checks)."""
    group = typer.main.get_command(cli.app)
    for (command, flag), mode in cli_tools.MODE_FLAGS.items():
        if argv[0] == command and flag in argv:
            argv = [mode, *(a for a in argv[1:] if a != flag)]
    ctx = group.make_context("livesr", [argv[0]])
    sub = group.get_command(ctx, argv[0])
    assert sub is not None, argv
    sub.make_context(argv[0], argv[1:], parent=ctx)


DOCUMENTED = documented_command_lines()


def test_the_docs_show_every_command():
    assert {argv[0] for argv in DOCUMENTED} >= {"demo", "replay", "live", "mda", "train", "finetune",
                                                "evaluate", "bench", "export", "engine", "keys"}


@pytest.mark.parametrize("argv", DOCUMENTED, ids=lambda a: " ".join(a)[:60])
def test_documented_command_line_parses(argv):
    parse_only(argv)


@pytest.mark.parametrize("argv, flag", [
    ([], "demo"), (["demo"], "--trust-window"), (["replay"], "--once"), (["live"], "--config"),
    (["mda"], "SEQUENCE.yaml"), (["train"], "--max-minutes"), (["finetune"], "--static-share"),
    (["evaluate"], "--n-wide"), (["evaluate", "--real"], "--figure-windows"), (["bench"], "--list-backends"),
    (["bench", "--pipeline"], "--capacity"), (["export"], "--no-check"), (["engine"], "--max-restarts"),
    (["keys"], "--name"),
])
def test_help_of_each_command(argv, flag, capsys):
    assert cli.main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: livesr" in out and flag in out


def test_building_the_cli_imports_neither_torch_nor_qt():
    code = ("import sys; from realtime import cli; cli.main(['--help']); cli.main(['demo', '--help']); "
            "print(sorted(m for m in ('torch', 'PySide6', 'qtpy') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_a_bad_flag_is_one_error_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--size", "many"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("livesr export: error: Invalid value for '--size'")
    assert len(err.strip().splitlines()) == 1
