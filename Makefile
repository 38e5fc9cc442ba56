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
# The browser client: its own npm project; the gateway serves dist/ at /.
WEB := clients/web
WEB_DEPS := $(WEB)/node_modules/.package-lock.json
WEB_DIST := $(WEB)/dist/index.html
WEB_SOURCES := $(shell find $(WEB)/src -type f 2>/dev/null) $(WEB)/build.mjs $(WEB)/package-lock.json

.PHONY: help setup gen check-gen lint test bench up down clean web chromium

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) node_modules/.package-lock.json $(WEB_DIST) ## Create .venv (torch first, pinned), install tools, build the page

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

$(WEB_DEPS): $(WEB)/package.json $(WEB)/package-lock.json
	cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error

$(WEB_DIST): $(WEB_DEPS) $(WEB_SOURCES)
	cd $(WEB) && npm run --silent build

web: node_modules/.package-lock.json $(WEB_DEPS) ## Install, check and build the web page (clients/web/dist)
	cd $(WEB) && npm run --silent check-gen
	cd $(WEB) && npm run --silent build

chromium: ## Install Chromium (Debian `chromium`) for the browser tests, unless present
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y chromium; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update && sudo apt-get install -y chromium; \
	else echo "The browser tests need Chromium: run 'apt-get install chromium' as root (no root or sudo here)." >&2; exit 1; fi

gen: setup ## Regenerate stubs (Python, TypeScript), the gateway descriptor and its container config
	$(PY) protos/generate.py
	cd $(WEB) && npm run --silent gen
	$(PY) deploy/render_gateway.py

check-gen: setup ## Fail if the committed generated code is stale
	$(PY) protos/generate.py --check
	cd $(WEB) && npm run --silent check-gen

lint: setup ## ruff, mypy, tsc (strict), buf lint/format/breaking
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd $(WEB) && npm run --silent typecheck
	npx buf lint
	npx buf format --diff --exit-code
	npx buf breaking --against '$(BUF_AGAINST)'

test: check-gen lint chromium ## Everything CI runs: generated code, lint, the whole test suite
	$(BIN)/pytest

bench: setup ## Run the benchmarks (ratios against in-process baselines)
	$(PY) benchmarks/health_under_load.py
	$(PY) benchmarks/img2img_overhead.py
	$(PY) benchmarks/mesh_stages.py
	$(PY) benchmarks/gateway_overhead.py
	$(PY) benchmarks/client_overhead.py

up: setup ## Start the stack in the foreground (Ctrl-C stops it); see README
	$(PY) deploy/local_stack.py up

down: ## Stop a stack started by `make up` in another terminal
	@if [ -x $(PY) ]; then $(PY) deploy/local_stack.py down; else echo "nothing to stop"; fi

clean: ## Remove the virtualenv, node_modules, the page build and local data
	rm -rf $(VENV) node_modules $(WEB)/node_modules $(WEB)/dist data .kiln
