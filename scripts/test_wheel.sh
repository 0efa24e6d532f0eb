#!/usr/bin/env bash
# Run the test suite against a built wheel installed outside the source tree (no editable finder,
# no source folder on sys.path), the way a user's install sees the package.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip wheel --no-deps --no-build-isolation -q -w "$WORK/dist" "$ROOT"
"$PY" -m pip install --no-deps -q --target "$WORK/site" "$WORK"/dist/*.whl
cp -r "$ROOT/tests" "$WORK/tests"
cp -r "$ROOT/bench" "$ROOT/experiments" "$WORK/"   # scripts, not package code: smoke tests run them against the wheel
cp -r "$ROOT/recipes" "$ROOT/deploy" "$WORK/"   # the 7B recipes and the Qdrant cluster example are checked as files
cp -r "$ROOT/scripts" "$WORK/"   # tests/test_demo_script.py runs the make demo script
cd "$WORK"
PYTHONPATH="$WORK/site" "$PY" -m pytest -q -p no:cacheprovider --import-mode=importlib tests "$@"
