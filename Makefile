# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test unit lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install  ## embedded broker + worker + traffic simulator, alerts and commands live
	$(VENV)/bin/coalmine demo $(ARGS)

# two processes, each with its own embedded broker: the integration tests mostly wait on
# wall-clock scenarios (load under 1 when run alone), so a second process halves the wall time
test: lint  ## lint first, then the whole suite: unit, slow and integration (embedded broker)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 2 --dist worksteal $(ARGS)

# bytecode caches on even where PYTHONDONTWRITEBYTECODE is set: each xdist worker otherwise
# compiles coalmine and rewrites the tests again (~3 s CPU a worker); worksteal: a worker left
# with the multi-second replay tests hands them to the idle one
unit: install  ## the suite without the integration (broker, workers) and slow (wheel build, browser, long stream) tests, on every core
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n auto --dist worksteal -m "not integration and not slow" $(ARGS)

lint: install  ## ruff (lint and format check) and mypy; `make test` runs it first
	$(VENV)/bin/ruff check coalmine tests benchmarks conftest.py
	$(VENV)/bin/ruff format --check coalmine tests benchmarks conftest.py
	$(VENV)/bin/mypy coalmine

bench: install  ## throughput, latency, memory and detection benchmarks
	$(PY) benchmarks/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
