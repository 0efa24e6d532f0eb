"""The library imports downward: nothing in the package imports the facade (``service``) back, not the
modules it drives (``ray_index``, ``verification``, ``shrinking``), not what they share (``errors``,
``loader``, ``service_view``), not even for type checking; the facade's names stay where users import
them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fwd2bot_index

PACKAGE = Path(fwd2bot_index.__file__).parent
FACADE = "fwd2bot_index.service"
#: the shells (cli/ api/ eval/ in the source tree) sit above the facade; an installed wheel places them inside the
#: package (``fwd2bot_index.cli`` ...), where they may import it
SHELLS = ("cli", "api", "eval")
#: every module of the package but the facade itself and the shells
MODULES = sorted(".".join(("fwd2bot_index",) + tuple(n for n in p.relative_to(PACKAGE).with_suffix("").parts
                                                     if n != "__init__"))
                 for p in PACKAGE.rglob("*.py")
                 if p != PACKAGE / "service.py" and p.relative_to(PACKAGE).parts[0] not in SHELLS)


def _imports(source: str, package: list[str]) -> set[str]:
    """Every module ``source`` (a file of ``package``) imports, as absolute names, at any depth of the file
    (lazy imports inside functions and ``if TYPE_CHECKING:`` blocks count: a type checker follows them)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            anchor = package[:len(package) - node.level + 1] if node.level else []
            base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # ``from . import service``
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _imported(module: str) -> set[str]:
    parts = module.split(".")
    path = PACKAGE.joinpath(*parts[1:])
    file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = parts if file.name == "__init__.py" else parts[:-1]
    return _imports(file.read_text(encoding="utf-8"), package)


def _upward(names: set[str]) -> set[str]:
    return {n for n in names if n == FACADE or n.startswith(FACADE + ".")}


def test_every_module_of_the_package_is_checked():
    for named in ("ray_index", "errors", "loader", "verification", "shrinking", "service_view", "indexing",
                  "collection.shrink", "model"):
        assert f"fwd2bot_index.{named}" in MODULES
    assert FACADE not in MODULES


@pytest.mark.parametrize("source, package", [
    ("from .service import ServiceError", ["fwd2bot_index"]),
    ("from . import service", ["fwd2bot_index"]),
    ("from ..service import ImageService", ["fwd2bot_index", "collection"]),
    ("from .. import service", ["fwd2bot_index", "collection"]),
    ("import fwd2bot_index.service", ["fwd2bot_index"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .service import ImageService", ["fwd2bot_index"]),
    ("def f():\n    from fwd2bot_index.service import open_service", ["fwd2bot_index", "model"]),
])
def test_the_check_sees_every_spelling_of_an_upward_import(source, package):
    """The check is only as good as its resolver: each spelling, at each depth, is the facade."""
    assert _upward(_imports(source, package))


def test_the_check_does_not_take_a_neighbour_for_the_facade():
    assert not _upward(_imports("from .service_view import ServiceView\nfrom .services import x", ["fwd2bot_index"]))
    assert not _upward(_imports("from .service import y", ["fwd2bot_index", "collection"]))  # collection.service


@pytest.mark.parametrize("module", MODULES)
def test_modules_below_the_facade_never_import_it(module):
    upward = _upward(_imported(module))
    assert not upward, f"{module} imports the facade: {sorted(upward)}"


def test_the_facade_keeps_its_public_names():
    from fwd2bot_index import errors, loader, service, sidecar

    assert service.ServiceError is errors.ServiceError and service.NotFoundError is errors.NotFoundError
    assert service.user_error_types is errors.user_error_types
    assert service.load_checked_model is loader.load_checked_model
    assert service.read_sidecar is sidecar.read_sidecar
    assert issubclass(errors.NotFoundError, LookupError)


def test_the_helpers_take_the_facade_by_its_shape():
    """``verification`` and ``shrinking`` type their argument as ``ServiceView``; ``ImageService`` has
    every member it declares, so the Protocol and the class cannot drift apart unnoticed."""
    from fwd2bot_index import shrinking, verification
    from fwd2bot_index.service import ImageService
    from fwd2bot_index.service_view import ServiceView

    declared = {n for n in vars(ServiceView) if not n.startswith("_")} | set(ServiceView.__annotations__)
    assert declared == {"collection", "model", "strategy", "query_vector"}
    assert all(hasattr(ImageService, n) for n in declared - {"collection"})
    stand_in = object()
    assert ImageService(stand_in, "a model").collection is stand_in
    for fn in (shrinking.check_index_tokens, shrinking.migrate_tokens, verification.refusal,
               verification.verify_hits, verification.verified_search):
        assert fn.__annotations__["service"] in ("ServiceView", ServiceView)
    assert shrinking.BudgetError and verification.VerifiedHit and verification.MAX_VERIFY  # still importable there
