# Kiln's task runner. Every target installs what it needs first; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The interpreter .venv is made from: the first of python3, python3.12, python3.11 that is 3.11 or
# 3.12 (the versions uv.lock covers; Homebrew's python3 is often newer). Override: PYTHON=...
PYTHON ?= $(shell for p in python3 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null && { echo $$p; break; }; \
	done)
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
# Versions come from uv.lock (all platforms, with hashes) through its exports in requirements/.
REQUIREMENTS := requirements/torch.txt requirements/runtime.txt requirements/dev.txt
# Where torch comes from. Default: pip's index (PyPI: the CUDA build on Linux, the MPS-capable one
# on macOS). For a CPU-only Linux box without several GB of CUDA libraries:
#   make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
# e.g. Linux-x86_64, Linux-aarch64, Darwin-arm64
PLATFORM ?= $(shell uname -s)-$(shell uname -m)
# Extra arguments for `uv lock`, e.g. LOCK_ARGS=--upgrade or LOCK_ARGS='--upgrade-package grpcio'.
LOCK_ARGS ?=
# v1 packages are frozen (WIRE_JSON) against the commit that introduced them; breaking
# changes go to a v2 package. Override to compare against something else, e.g. a branch.
BUF_AGAINST ?= .git\#ref=$(shell git log --diff-filter=A --format=%H -- buf.yaml | tail -n 1)
export OMP_WAIT_POLICY ?= PASSIVE
# The browser client: its own npm project; the gateway serves dist/ at /.
WEB := clients/web
WEB_DEPS := $(WEB)/node_modules/.package-lock.json
WEB_DIST := $(WEB)/dist/index.html
WEB_SOURCES := $(shell find $(WEB)/src -type f 2>/dev/null) $(WEB)/build.mjs $(WEB)/package-lock.json

.PHONY: help setup lock gen check-gen lint test bench up down clean web chromium device-check

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) node_modules/.package-lock.json $(WEB_DIST) ## Create .venv from uv.lock (torch first), install tools, build the page

$(VENV)/pyvenv.cfg:
	@test -n "$(PYTHON)" || { echo "Kiln needs Python 3.11 or 3.12 (the versions uv.lock covers) as python3," \
		"python3.12 or python3.11; on a Mac: brew install python@3.12. Or: make PYTHON=/path/to/python3.12 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/pyvenv.cfg $(REQUIREMENTS) pyproject.toml clients/python/pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, at the locked version, from the index that fits this machine; its CUDA
	# libraries (Linux) come with it. Nothing after this resolves anything, so nothing can swap it.
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) -r requirements/torch.txt
	@# PyPI has no Linux aarch64 wheels of PyMCubes and xatlas (tests/test_lock.py: SDIST_BUILDS), so
	@# pip compiles them there: that needs a C++ compiler and Python's headers.
	@if [ "$(PLATFORM)" = Linux-aarch64 ] && ! { command -v c++ >/dev/null && $(PY) -c 'import os, sys, sysconfig; \
		sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; }; then \
		echo "On Linux aarch64 pip compiles PyMCubes and xatlas (PyPI has no wheels for it): install a C++" \
			"compiler and Python's headers first (Debian/Ubuntu: sudo apt-get install build-essential python3-dev)." >&2; \
		exit 1; fi
	# Everything else exactly as locked (hash-checked; markers pick this platform's files)...
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements/dev.txt
	# ...then Kiln's two packages, editable, on top.
	$(PY) -m pip install --quiet --no-deps -e ./clients/python -e .
	# Fails when pyproject.toml asks for something uv.lock lacks: run `make lock`.
	$(PY) -m pip check
	# rembg's first import JIT-compiles pymatting (about a minute): pay it here, not in a request.
	$(PY) -c "import rembg"
	touch $@

# uv alone, at the version dev.txt pins: `make lock` must work even when the lock is behind
# pyproject.toml (which makes a full setup fail its `pip check`).
$(BIN)/uv: $(VENV)/pyvenv.cfg requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps "uv==$$(sed -n 's/^uv==\([^ ;]*\).*/\1/p' requirements/dev.txt)"
	touch $@

lock: $(BIN)/uv ## Re-resolve uv.lock for every platform (needs PyPI) and rewrite requirements/ from it
	UV_PYTHON_DOWNLOADS=never $(BIN)/uv lock --python $(PY) $(LOCK_ARGS)
	$(PY) requirements/export.py

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error

$(WEB_DEPS): $(WEB)/package.json $(WEB)/package-lock.json
	cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error

$(WEB_DIST): $(WEB_DEPS) $(WEB_SOURCES)
	cd $(WEB) && npm run --silent build

web: node_modules/.package-lock.json $(WEB_DEPS) ## Install, check and build the web page (clients/web/dist)
	cd $(WEB) && npm run --silent check-gen
	cd $(WEB) && npm run --silent build

# The browsers the browser tests look for (tests/tools.py), in its order after KILN_CHROMIUM.
BROWSERS := chromium chromium-browser google-chrome google-chrome-stable \
	"/Applications/Chromium.app/Contents/MacOS/Chromium" "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome" \
	"$$HOME/Applications/Chromium.app/Contents/MacOS/Chromium" "$$HOME/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"

chromium: ## Find Chrome/Chromium for the browser tests, else install Debian's `chromium` (Linux, root or sudo)
	@found=""; for candidate in "$${KILN_CHROMIUM:-}" $(BROWSERS); do \
		if [ -n "$$candidate" ] && path=$$(command -v "$$candidate") && [ -x "$$path" ]; then found=$$path; break; fi; \
	done; \
	if [ -n "$$found" ]; then echo "chromium: $$found"; \
	elif [ "$$(uname -s)" = Darwin ]; then \
		echo "The browser tests need Chrome or Chromium: brew install --cask chromium (or google-chrome)." >&2; exit 1; \
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

test: check-gen lint ## Everything CI runs: generated code, lint, the whole test suite
	@# Without a browser the browser tests skip, saying how to get one; under CI they must run.
	@$(MAKE) --no-print-directory chromium || case "$$(echo "$${CI:-}" | tr A-Z a-z)" in \
		""|0|false|no) echo "make test: no browser here, so the browser tests will be skipped." >&2;; *) exit 1;; esac
	$(BIN)/pytest

bench: setup ## Run the benchmarks (ratios against in-process baselines)
	$(PY) benchmarks/health_under_load.py
	$(PY) benchmarks/img2img_overhead.py
	$(PY) benchmarks/mesh_stages.py
	$(PY) benchmarks/gateway_overhead.py
	$(PY) benchmarks/client_overhead.py
	$(PY) benchmarks/cold_start.py
	$(PY) benchmarks/refused_upload_cpu.py
	$(PY) benchmarks/artifact_io.py
	$(PY) benchmarks/edge_overhead.py
	$(PY) benchmarks/jobs.py
	$(PY) benchmarks/img2img_batching.py

device-check: setup ## CUDA machine: full-size models vs raw diffusers/TripoSR, CUDA tests (benchmarks/gpu)
	$(PY) benchmarks/gpu/device_check.py

up: setup ## Start the stack in the foreground (Ctrl-C stops it); KILN_TLS=dev: HTTPS + mutual TLS (deploy/README.md)
	$(PY) deploy/local_stack.py up

down: ## Stop a stack started by `make up` in another terminal
	@if [ -x $(PY) ]; then $(PY) deploy/local_stack.py down; else echo "nothing to stop"; fi

clean: ## Remove the virtualenv, node_modules, the page build and local data
	rm -rf $(VENV) node_modules $(WEB)/node_modules $(WEB)/dist data .kiln
