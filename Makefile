# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup services lint typecheck schemas chaos

demo: setup services
	$(BIN)/sagabus demo --sagas 200

test: setup services
	$(BIN)/pytest

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

services:
	bash scripts/services.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy messaging process_manager schemas participants cli

schemas: setup
	$(BIN)/python -m schemas.jsonschema
