"""The wheel's import layout: cli/, api/, eval/ install under fwd2bot_index, never top level."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fwd2bot_index

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if not (REPO / "pyproject.toml").is_file():
        pytest.skip("not running from a source checkout (tests of an installed wheel)")
    out = tmp_path_factory.mktemp("wheel")
    # build from a clean copy: a stale build/ folder in the checkout would hide a package missing from pyproject
    source = tmp_path_factory.mktemp("source") / "repo"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                                  "__pycache__", ".f2b", "runs", "demo-data"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True, capture_output=True, text=True,
    )
    return next(out.glob("fwd2bot_index-*.whl"))


def test_wheel_maps_shells_under_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for shell in ("cli", "api", "eval"):
        assert f"fwd2bot_index/{shell}/__init__.py" in names, shell
        assert not any(n.startswith(f"{shell}/") for n in names), f"top-level {shell}/ in wheel"
    assert not any(n.startswith("tests/") for n in names)
    assert "fwd2bot_index/api/static/index.html" in names  # the search page ships with the package
    # every package of the source tree is in the wheel (pyproject lists packages by hand)
    for init in sorted((REPO / "fwd2bot_index").rglob("__init__.py")):
        assert init.relative_to(REPO).as_posix() in names, f"{init.parent.name} is missing from pyproject's packages"


def test_installed_wheel_imports_cli_outside_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    code = ("import fwd2bot_index, fwd2bot_index.cli, fwd2bot_index.api, fwd2bot_index.eval, fwd2bot_index.training.demo;"
            "print(fwd2bot_index.__file__)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))


def test_version_is_exposed():
    assert fwd2bot_index.__version__.count(".") == 2
