# Set-up and the main jobs. `make demo` runs the main job, `make test` runs the tests; both create
# the virtual environment on first use (torch 2.13.0 CPU first, so pip never pulls CUDA wheels).
VENV ?= .venv
PY := $(VENV)/bin/python
F2B := $(VENV)/bin/f2b
DEMO_DIR ?= demo-data
DEMO_N ?= 300

.PHONY: install demo test test-wheel bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	F2B_DEMO_DIR=$(DEMO_DIR) DEMO_N=$(DEMO_N) bash scripts/demo.sh

test: install
	$(PY) -m pytest -q

# The same tests against a built wheel installed outside the source tree.
test-wheel: install
	bash scripts/test_wheel.sh

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf build dist *.egg-info .pytest_cache $(DEMO_DIR) .f2b
