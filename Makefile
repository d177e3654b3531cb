# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create and use the project's own virtual environment in .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench venv clean testbed testbed-down

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/livemig demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/livemig bench $(BENCH_ARGS)
	$(PY) -m agent.bench.storage_bench $(STORAGE_BENCH_ARGS)

# Three hosts in network namespaces, 1 Gbit/s links (root; see deploy/testbed.sh).
testbed: $(STAMP)
	deploy/testbed.sh up 3 --rate 1gbit

testbed-down:
	deploy/testbed.sh down

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
