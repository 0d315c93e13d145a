# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up first.
VENV := .venv
BIN := $(VENV)/bin
DEMO_CONFIG ?= examples/parle.yaml

.PHONY: setup demo test test-compose lint typecheck unit bench clean

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

# docker-compose.yml in a real Docker engine (root, or a running engine): installs docker.io and debootstrap
# when missing, starts dockerd when none answers, builds the images offline (cached), runs the cluster.
test-compose: setup
	PARLE_COMPOSE_TEST=1 $(BIN)/pytest -s tests/test_compose.py

bench: setup
	$(BIN)/python -m bench.inner_step

clean:
	rm -rf $(VENV) runs .mypy_cache .pytest_cache .ruff_cache
