# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up first.
VENV := .venv
BIN := $(VENV)/bin
DEMO_CONFIG ?= examples/parle.yaml

.PHONY: setup demo test lint typecheck unit bench clean

setup:
	@scripts/setup.sh

demo: setup
	$(BIN)/parle train $(DEMO_CONFIG)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

bench: setup
	$(BIN)/python -m bench.inner_step

clean:
	rm -rf $(VENV) runs .mypy_cache .pytest_cache .ruff_cache
