# Kiln's task runner. Every target installs what it needs first; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
TORCH_VERSION := 2.13.0
# v1 packages are frozen (WIRE_JSON) against the commit that introduced them; breaking
# changes go to a v2 package. Override to compare against something else, e.g. a branch.
BUF_AGAINST ?= .git\#ref=$(shell git log --diff-filter=A --format=%H -- buf.yaml | tail -n 1)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: help setup gen check-gen lint test bench up down clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) node_modules/.package-lock.json ## Create .venv (torch first, pinned) and install tools

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing later can pull another (multi-GB) build.
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ./clients/python -e '.[dev]'
	# rembg's first import JIT-compiles pymatting (about a minute): pay it here, not in a request.
	$(PY) -c "import rembg"
	touch $@

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error

gen: setup ## Regenerate Python stubs and the gateway descriptor from protos/
	$(PY) protos/generate.py

check-gen: setup ## Fail if the committed generated code is stale
	$(PY) protos/generate.py --check

lint: setup ## ruff, mypy, buf lint/format/breaking
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	npx buf lint
	npx buf format --diff --exit-code
	npx buf breaking --against '$(BUF_AGAINST)'

test: check-gen lint ## Everything CI runs: generated code, lint, the whole test suite
	$(BIN)/pytest

bench: setup ## Run the benchmarks (ratios against in-process baselines)
	$(PY) benchmarks/health_under_load.py
	$(PY) benchmarks/img2img_overhead.py
	$(PY) benchmarks/mesh_stages.py
	$(PY) benchmarks/gateway_overhead.py

up: setup ## Start the stack in the foreground (Ctrl-C stops it); see README
	$(PY) deploy/local_stack.py up

down: ## Stop a stack started by `make up` in another terminal
	@if [ -x $(PY) ]; then $(PY) deploy/local_stack.py down; else echo "nothing to stop"; fi

clean: ## Remove the virtualenv, node_modules and local data
	rm -rf $(VENV) node_modules data .kiln
