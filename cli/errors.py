"""One line for every refused argument, in the style of the CLI's own refusals.

typer (with rich) prints click's usage errors (a value out of range, a word where a number belongs, an
unknown option) as a usage line plus a 5-6 line box; every other refusal of `f2b` is one line,
``error: --device 'tpu' is not known: use ...``, exit 2. ``OneLineGroup`` is the app's click group:
it runs the command line as typer does and turns click's usage errors into that one line.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Sequence

from typer.core import TyperGroup

try:  # typer >= 0.24 runs on its own copy of click; older typers on click itself
    from typer import _click as click
    from typer._click import exceptions as _exceptions
except ImportError:  # pragma: no cover
    import click
    from click import exceptions as _exceptions
try:  # typer's own click copy raises typer.exceptions.Abort (its exceptions module has none: naming a missing
    # one in an ``except`` turned every unexpected error of a command into an AttributeError from this handler)
    from typer.exceptions import Abort as _Abort
except ImportError:  # pragma: no cover
    from click.exceptions import Abort as _Abort

_REWORDED = [  # click / typer wording -> ours (what to give instead)
    (re.compile(r"^Input should be greater than or equal to (\S+)$"), r"use a value of at least \1"),
    (re.compile(r"^Input should be less than or equal to (\S+)$"), r"use a value of at most \1"),
    (re.compile(r"^Input should be greater than (\S+)$"), r"use a value above \1"),
    (re.compile(r"^Input should be less than (\S+)$"), r"use a value below \1"),
    (re.compile(r"^.* is not in the range (\S+)<=x<=(\S+)$"), r"use a value from \1 to \2"),
    (re.compile(r"^.* is not in the range x>=(\S+)$"), r"use a value of at least \1"),
    (re.compile(r"^.* is not in the range x<=(\S+)$"), r"use a value of at most \1"),
    (re.compile(r"^Input should be a valid integer.*$"), "use a whole number"),
    (re.compile(r"^Input should be a valid number.*$"), "use a number"),
    (re.compile(r"^.* is not a valid integer$"), "use a whole number"),
    (re.compile(r"^.* is not a valid float$"), "use a number"),
    (re.compile(r"^.* is not a valid boolean$"), "use true or false"),
]


def _given(args: Sequence[str], opts: Sequence[str]) -> str | None:
    """The value the user typed for an option (``--limit abc``, ``--limit=abc``, ``-kabc``), if found."""
    for i, arg in enumerate(args):
        for opt in opts:
            if arg == opt and i + 1 < len(args):
                return args[i + 1]
            if opt.startswith("--") and arg.startswith(opt + "="):
                return arg[len(opt) + 1:]
            if not opt.startswith("--") and arg.startswith(opt) and len(arg) > len(opt):
                return arg[len(opt):]
    return None


def one_line(exc: Any, args: Sequence[str]) -> str:
    """The usage error as ``error: <what> <value>: <what to use>`` plus where help is (no newline)."""
    ctx = getattr(exc, "ctx", None)
    where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
    reason = " ".join(str(exc.message).split()).rstrip(".")
    param = getattr(exc, "param", None)
    if isinstance(exc, _exceptions.MissingParameter) and param is not None:
        kind = getattr(param, "param_type_name", "parameter")
        name = max(param.opts, key=len) if kind == "option" else (getattr(param, "metavar", None) or param.name or "").upper()
        return f"error: missing {kind} {name}{where}"
    if isinstance(exc, _exceptions.BadParameter) and param is not None:
        if getattr(param, "param_type_name", "") == "option":
            longest = max(param.opts, key=len)
            value = _given(args, param.opts + param.secondary_opts)
            what = longest if value is None else f"{longest} {value!r}"
        else:
            what = (param.human_readable_name or param.name or "argument").upper()
        for pattern, replacement in _REWORDED:
            if pattern.match(reason):
                reason = pattern.sub(replacement, reason)
                break
        return f"error: {what}: {reason}{where}"
    if reason[:1].isupper() and not reason[1:2].isupper():
        reason = reason[0].lower() + reason[1:]
    return f"error: {reason}{where}"


class OneLineGroup(TyperGroup):
    """typer's group, with click's usage errors printed as one line (exit 2, as click does)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except _exceptions.NoArgsIsHelpError as exc:  # `f2b` alone: the help, as before
            text = exc.ctx.get_help()  # typer's rich help prints itself and returns ""
            if text:
                click.echo(text)
            sys.exit(exc.exit_code)
        except _exceptions.UsageError as exc:
            click.echo(one_line(exc, argv), err=True)
            sys.exit(exc.exit_code)
        except _exceptions.ClickException as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except _Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if type(rv) is int else 0)  # an int is a typer.Exit code; what a command returns is not
