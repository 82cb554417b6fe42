# Loan Engine: the front door. `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
UV_VERSION ?= 0.13.9
HOST ?= 127.0.0.1
PORT ?= 8000
TEST_DATABASE_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/test
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
TEST_CELERY_BROKER_URL ?= redis://127.0.0.1:6379/13
PYTEST_ARGS ?=

# Use uv from PATH when present; otherwise bootstrap a pinned uv into .tools/.
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := .tools/bin/uv
endif
VENV := .venv
BIN := $(VENV)/bin

export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never

.PHONY: help install run worker test lint format typecheck migrate seed services check-observability check-deploy bench clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --all-groups
	@touch $@

install: $(VENV)/.synced  ## Create .venv with the locked dependencies

migrate: install  ## Apply database migrations (DATABASE_URL, default SQLite under ./var)
	$(BIN)/python -m backend.admin.cli migrate

seed: install  ## Create the admin account if none exists
	$(BIN)/python -m backend.admin.cli seed-admin

run: migrate seed  ## Serve on $(HOST):$(PORT) (SQLite by default)
	$(BIN)/uvicorn backend.api.main:app --host $(HOST) --port $(PORT) --no-server-header

worker: migrate  ## A Celery worker for pipeline runs (PIPELINE_EXECUTOR=celery, CELERY_BROKER_URL)
	$(BIN)/celery -A backend.worker --quiet worker -O fair --without-gossip --without-mingle

lint: install  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install  ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install  ## mypy (strict)
	$(BIN)/mypy backend

services:  ## Start PostgreSQL and Redis when they are not running; create the test database
	@bash .ci/services.sh

check-observability:  ## Validate the Prometheus config (promtool) and the compose file (docker-compose)
	@bash .ci/apt-tools.sh promtool=prometheus docker-compose=docker-compose
	promtool check config observability/prometheus/prometheus.yml
	docker-compose -f docker-compose.observability.yml config -q

check-deploy: install check-observability  ## cfn-lint on the CloudFormation stack, hadolint on the Dockerfile, shellcheck on the scripts
	$(BIN)/cfn-lint deploy/aws/stack.yaml
	$(BIN)/hadolint deploy/Dockerfile
	$(BIN)/shellcheck deploy/*.sh .ci/*.sh .ci/run

test: install lint typecheck check-deploy services  ## ruff, mypy, config checks, then the whole pytest suite on PostgreSQL and Redis
	TEST_DATABASE_URL=$(TEST_DATABASE_URL) TEST_REDIS_URL=$(TEST_REDIS_URL) \
		TEST_CELERY_BROKER_URL=$(TEST_CELERY_BROKER_URL) \
		$(BIN)/pytest $(PYTEST_ARGS)

bench: install services  ## Benchmarks (figures and ratios on stdout)
	@for script in bench/[!_]*.py; do echo "== $$script"; TEST_DATABASE_URL=$(TEST_DATABASE_URL) $(BIN)/python $$script || exit 1; done

clean:  ## Remove the virtualenv, caches and local data
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache .mypy_cache var
