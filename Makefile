# `make demo` and `make test` each do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers: each XLA compile uses about one core, so one per core (2 here)
TEST_WORKERS ?= 2

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/gpt.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/plan_quality.py
	$(BIN)/python benchmarks/iopddl.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/dump_size.py
	$(BIN)/python benchmarks/nnx_annotations.py
	$(BIN)/python benchmarks/plan_time.py --loaded

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
