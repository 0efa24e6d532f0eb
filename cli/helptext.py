"""Help that reads like help: metavars instead of Python type names, and no text eaten as rich markup.

typer 0.29 prints an option's Python type (``<bool>``, ``<list[Path]>``, ``<str>``) unless the option
has a metavar, and reads ``[...]`` in help texts as rich markup (so "[env F2B_COLLECTION]" vanished).
One pass over the registered commands sets a plain metavar on every parameter that has none and
escapes the help texts, so the commands themselves stay declared the ordinary typer way.
"""

from __future__ import annotations

import typing
from pathlib import Path

import typer
from rich.markup import escape
from typer.models import ArgumentInfo, OptionInfo

# argument names that read better under another word in "Usage: f2b ask ID|PATH QUESTION"
_ARGUMENT_NAMES = {"dirs": "DIR", "text": "QUERY", "ref": "ID|PATH", "refs": "ID|PATH", "out_dir": "DIR",
                   "out": "FILE"}
# option values by parameter name, where the type alone would say only TEXT
_OPTION_NAMES = {"model": "MODEL", "device": "DEVICE", "dtype": "DTYPE", "backend": "BACKEND", "strategy": "STRATEGY",
                 "collection": "DIR", "images": "DIR", "out": "DIR", "output_dir": "DIR", "data": "PATH",
                 "filters": "KEY=VALUE", "exclude": "GLOB", "like": "ID|PATH", "host": "ADDRESS",
                 "qdrant_url": "URL", "api_key": "KEY", "split": "SPLIT", "dataset": "NAME",
                 "index_kind": "KIND", "faiss_index": "KIND", "qdrant_collection": "NAME",
                 "qdrant_quantization": "KIND", "token_dtype": "DTYPE", "ray": "ADDRESS", "allowed_hosts": "HOST",
                 "recipe": "NAME", "objective": "NAME", "nested": "K,K,...", "lora_targets": "REGEX",
                 "pool_schedule": "SCHEDULE", "distill_layout": "LAYOUT", "image_readout": "READOUT",
                 "text_readout": "READOUT"}


def _metavar(name: str, annotation: typing.Any, argument: bool) -> str:
    """A word for the value: by name where known, else by type; '' for a flag."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    while typing.get_origin(annotation) in (typing.Union, list, typing.List) or (args and annotation not in args):
        if not args:
            break
        annotation = args[0]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is bool:
        return ""
    if argument:
        return _ARGUMENT_NAMES.get(name, name.upper())
    if name in _OPTION_NAMES:
        return _OPTION_NAMES[name]
    if annotation is int:
        return "N"
    if annotation is float:
        return "NUMBER"
    if annotation is Path:
        return "PATH"
    return "TEXT"


def _tidy_callback(callback: typing.Callable, done: set[int]) -> None:
    import inspect

    hints = typing.get_type_hints(callback)
    for name, param in inspect.signature(callback).parameters.items():
        info = param.default
        if not isinstance(info, (OptionInfo, ArgumentInfo)):
            continue
        if info.metavar is None:
            info.metavar = _metavar(name, hints.get(name), isinstance(info, ArgumentInfo))
        if id(info) not in done and info.help:
            info.help = escape(info.help)
            done.add(id(info))
    if callback.__doc__:
        callback.__doc__ = escape(callback.__doc__)


def _argument_type_column(self, ctx) -> str | None:
    """typer shows an argument's Python type even when it has a metavar (options honour it): honour it."""
    return None if self.metavar is not None else self.display_type(ctx)


def _option_type_column(self, ctx) -> str | None:
    """A flag (``--help`` included, which no pass can reach) takes no value: show none, not ``<bool>``."""
    if self.metavar is not None:
        return self.metavar
    return None if self.is_flag else self.display_type(ctx)


def tidy_help(app: typer.Typer, done: set[int] | None = None) -> None:
    """Give every parameter of every command (sub-apps included) a metavar and escaped help."""
    from typer.core import TyperArgument, TyperOption

    TyperArgument.display_type_rich = _argument_type_column
    TyperOption.display_type_rich = _option_type_column
    done = set() if done is None else done
    for command in app.registered_commands:
        if command.callback is not None and id(command.callback) not in done:
            done.add(id(command.callback))
            _tidy_callback(command.callback, done)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            tidy_help(group.typer_instance, done)
