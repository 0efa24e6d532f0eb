"""The library imports downward: what the facade drives (``ray_index``) and what both share (``errors``,
``loader``) never import the facade (``service``); the facade's names stay where users import them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fwd2bot_index

PACKAGE = Path(fwd2bot_index.__file__).parent


def _imported(module: str) -> set[str]:
    """Every module a file imports, at any depth of the file (lazy imports inside functions count)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            if not node.module:  # ``from . import service``
                names.update(base + alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("module", ["ray_index", "errors", "loader", "image_shape", "imaging", "scanning"])
def test_modules_below_the_facade_never_import_it(module):
    imported = _imported(module)
    assert not {n for n in imported if n in (".service", "fwd2bot_index.service") or n.startswith(".service.")}


def test_the_facade_keeps_its_public_names():
    from fwd2bot_index import errors, loader, service

    assert service.ServiceError is errors.ServiceError and service.NotFoundError is errors.NotFoundError
    assert service.user_error_types is errors.user_error_types
    assert service.load_checked_model is loader.load_checked_model
    assert issubclass(errors.NotFoundError, LookupError)
