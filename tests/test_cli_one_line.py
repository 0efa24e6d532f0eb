"""Issue 23: every bad value is refused in one line, in the CLI's own style (`error: ...`, exit 2), before
anything loads: range and type errors, unknown options and missing arguments included (typer printed
them as a usage line plus a 5-6 line box)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fwd2bot_index.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize(("args", "needles"), [
    (["search", "x", "-k", "0"], ["--limit '0'", "at least 1", "f2b search --help"]),
    (["search", "x", "-k", "-1"], ["--limit '-1'", "at least 1"]),
    (["search", "x", "-k0"], ["--limit '0'"]),
    (["search", "x", "--limit", "abc"], ["--limit 'abc'", "whole number"]),
    (["search", "x", "--limit=abc"], ["--limit 'abc'"]),
    (["search", "x", "--min-score", "abc"], ["--min-score 'abc'", "use a number"]),
    (["search", "x", "--offset", "-3"], ["--offset '-3'", "at least 0"]),
    (["serve", "--port", "99999"], ["--port '99999'", "at most 65535", "f2b serve --help"]),
    (["index", "d", "--batch-size", "0"], ["--batch-size '0'", "at least 1"]),
    (["search", "x", "--bogus"], ["no such option", "--bogus"]),
    (["index"], ["missing argument DIR", "f2b index --help"]),
    (["ask", "1"], ["missing argument QUESTION"]),
])
def test_bad_values_are_one_line(args, needles):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "╭" not in result.output and "Usage:" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_the_installed_command_line_prints_the_same_line():
    """Through `python -m` (what the `f2b` script runs), not only the test runner: stderr, exit 2."""
    done = subprocess.run([sys.executable, "-m", "fwd2bot_index.cli", "search", "x", "-k", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["error: --limit '0': use a value of at least 1 (see f2b search --help)"]


def test_no_arguments_still_show_the_help_and_version_still_works():
    bare = runner.invoke(app, [])
    assert "Usage" in bare.output and "index" in bare.output
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("f2b (fwd2bot-index)")
    fine = runner.invoke(app, ["search", "--help"])
    assert fine.exit_code == 0 and "--limit" in fine.output


def _commands(group=None, prefix=()):
    import typer

    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, prefix + (name,))
        else:
            yield list(prefix + (name,))


def test_help_names_env_vars_one_way_and_values_by_what_they_are():
    """Environment variables as '(env F2B_...)' in the text (typer's '[env var: ...]' was a second way),
    and every option's value named by what it is, not a bare TEXT."""
    seen = 0
    for path in _commands():
        shown = runner.invoke(app, path + ["--help"], terminal_width=200, env={"COLUMNS": "200"})
        assert shown.exit_code == 0, shown.output
        assert "[env var" not in shown.stdout, f"f2b {' '.join(path)}"
        assert " TEXT " not in shown.stdout, f"f2b {' '.join(path)} --help shows a bare TEXT"
        seen += 1
    assert seen >= 12
    serve = runner.invoke(app, ["serve", "--help"], terminal_width=200, env={"COLUMNS": "200"}).stdout
    assert "env F2B_API_KEY" in serve and "env F2B_THREADS" in serve


def test_an_interrupt_exits_130_and_an_unexpected_error_stays_itself():
    """The handler names typer's Abort (typer's click copy has none of its own): Ctrl-C exits 130, and a bug in a
    command surfaces as that bug, not as an AttributeError raised by the handler's ``except`` clause."""
    import typer

    from fwd2bot_index.cli.errors import OneLineGroup

    app = typer.Typer(cls=OneLineGroup)

    @app.command()
    def stop() -> None:
        raise KeyboardInterrupt

    @app.command()
    def boom() -> None:
        raise RuntimeError("a bug")

    command = typer.main.get_command(app)
    with pytest.raises(SystemExit) as exit_info:
        command.main(["stop"], prog_name="f2b")
    assert exit_info.value.code == 130
    with pytest.raises(RuntimeError, match="a bug"):
        command.main(["boom"], prog_name="f2b")
