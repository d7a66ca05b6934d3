# The two commands: `make demo` runs the whole lifecycle on embedded defaults, `make test` runs the tests.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.voxelflow-installed

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PYTHONWARNINGS ?= ignore::FutureWarning,ignore::DeprecationWarning

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build where a CPU one is enough
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/voxelflow demo

test: $(STAMP)
	$(VENV)/bin/ruff check src flows tasks tests benchmarks
	# two test processes, one test file each at a time: the suite waits on servers and subprocesses about half
	# the time, so two keep both cores busy (about 440 s instead of 660 s on 2 cores)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# the inner loop: everything but the tests marked slow (whole lifecycles, deployments, the notebook)
test-fast: $(STAMP)
	$(VENV)/bin/ruff check src flows tasks tests benchmarks
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf .voxelflow
