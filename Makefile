# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install  ## embedded broker + worker + traffic simulator, alerts and commands live
	$(VENV)/bin/coalmine demo $(ARGS)

test: install  ## the whole suite, unit and integration (embedded broker)
	$(PY) -m pytest -q $(ARGS)

bench: install  ## throughput, latency, memory and detection benchmarks
	$(PY) benchmarks/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
