# One command each: `make demo` runs the main job, `make test` the tests. Both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export MELTANO_SEND_ANONYMOUS_USAGE_STATS := false

.PHONY: setup demo test check lint types bench clean

setup: $(VENV)/.installed

# The tap, and beside it the sandbox (its own package in sandbox/, not a dependency of the tap).
$(VENV)/.installed: pyproject.toml sandbox/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e ./sandbox
	touch $@

# The tap against the sandbox, through `meltano run`, into DuckDB; then each table and its rows.
demo: setup
	$(BIN)/meltano install extractor tap-commerce-exports
	$(BIN)/meltano install loader target-duckdb
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check tap_commerce_exports sandbox tests scripts benchmarks
	$(BIN)/ruff format --check tap_commerce_exports sandbox tests scripts benchmarks

types: setup
	$(BIN)/mypy tap_commerce_exports

# Everything CI checks, locally.
check: lint types test

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .meltano output .pytest_cache
