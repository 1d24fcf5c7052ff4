# Sequencer: `make run` starts the embedded stack, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint fmt migrate worker api bench clean-dev

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 11))" || { echo "Python 3.11+ is required; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its dev tools

run: $(STAMP) ## Start Temporal (UI :8233), PostgreSQL, SMTP catcher, worker and webhook app; Ctrl-C stops all
	$(PY) -m devstack.run

test: lint ## Run the whole test suite: lint (ruff, mypy), then pytest (real PostgreSQL, Temporal, SMTP, IMAP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## Only the tests that need no server (seconds), no lint
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff, mypy and the layer contract (import-linter)
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

fmt: $(STAMP) ## Format and auto-fix with ruff
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

migrate: $(STAMP) ## alembic upgrade head against DATABASE_URL
	$(VENV)/bin/alembic upgrade head

worker: $(STAMP) ## Run the worker alone against TEMPORAL_ADDRESS and DATABASE_URL
	$(PY) worker.py

api: $(STAMP) ## Run the webhook app alone (uvicorn webhooks.app:app)
	$(VENV)/bin/uvicorn webhooks.app:app --host $${API_HOST:-127.0.0.1} --port $${API_PORT:-8000}

bench: $(STAMP) ## Run the benchmarks on the dev server and append to bench/RESULTS.md
	$(PY) -m bench.run $(BENCH_ARGS)

clean-dev: ## Stop nothing, delete .dev/ (the embedded stack's data)
	rm -rf .dev
