# Bastion's developer commands. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(VENV)/bin
# Re-installed whenever pyproject.toml is newer than this stamp.
STAMP := $(VENV)/.installed
# The first interpreter on PATH that is Python 3.11 or newer.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && { command -v $$p; break; }; done)
IN_CI := $(filter true 1 yes,$(CI))
# Extra arguments for pytest: make test PYTEST_ARGS="-k health -x"
PYTEST_ARGS ?=

.PHONY: help venv serve test lint bench docs clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z]+:.*## / {printf "  make %-6s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(STAMP) ## Create .venv (Python 3.11+) and install bastion with its dev extras

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: Python 3.11 or newer is required" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $@

serve: venv ## Migrate the reference service's database (./var/) and serve it on 127.0.0.1:8000
	@mkdir -p var
	$(BIN)/bastion migrate upgrade
	$(BIN)/bastion serve

test: venv ## Start or check PostgreSQL, Redis, NATS, RabbitMQ; run the whole suite with coverage
	@scripts/services.sh $(if $(IN_CI),--require)
	@# Exit status 5 (no test collected) fails too: this suite always has tests, so
	@# collecting none means the run is broken, and a green run would hide it.
	$(BIN)/pytest --cov=bastion --cov-branch --cov-report=term --durations=10 $(PYTEST_ARGS)

lint: venv ## ruff check, ruff format --check, mypy --strict (src/bastion and tests/typing)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy src/bastion tests/typing

bench: venv ## Request-path overhead of bastion against bare Starlette and FastAPI
	$(BIN)/python bench/http_overhead.py

docs: venv ## Check that generated pages are current and relative links resolve; list pages
	$(BIN)/python scripts/gen_config_docs.py --check
	$(BIN)/python scripts/check_docs.py

clean: ## Remove caches, coverage data and build output (keeps .venv and ./var)
	rm -rf .mypy_cache .ruff_cache .pytest_cache .hypothesis htmlcov build dist
	rm -f .coverage .coverage.* coverage.xml
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d \
		-exec rm -rf {} +
