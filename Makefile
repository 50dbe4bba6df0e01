# The two commands of the README. Each sets up a virtual environment in .venv
# (idempotent) and then runs: `make demo` the main demo, `make test` the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test setup setup-dev lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e '.[dev,fast,scenarios,dp]'
	touch $@

# torch is installed as the local CPU build, pinned, before the project's extras:
# an unpinned torch requirement could pull a multi-gigabyte GPU build.
$(VENV)/.installed-torch: pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,fast,torch,scenarios,dp,flower]'
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m scenarios.demo

test: $(VENV)/.installed-torch
	$(PY) -m ruff check secagg peers server scenarios benchmarks tests
	$(PY) -m mypy secagg peers server
	$(PY) -m pytest -q; status=$$?; if [ $$status -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$status

lint: $(VENV)/.installed
	$(PY) -m ruff check secagg peers server scenarios benchmarks tests
	$(PY) -m mypy secagg peers server

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
