# capital-ledger: the two commands are `make demo` and `make test` (see README.md).
# Each does all set-up itself on a fresh machine: a Python >= 3.11 virtualenv in
# .venv, the package with its dev extras (re-installed only when pyproject.toml
# changes), the Kafka jars from Maven Central, Kafka + PostgreSQL started, schema
# migrated. State and caches live outside the repository (streams/common/config.py).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-stamp
PYTEST_ARGS ?=

.PHONY: help demo test test-all lint unit up down status venv browser

help:
	@echo "make demo    start Kafka + PostgreSQL, play the seed's OTC market on five nodes via the API"
	@echo "make test    lint (ruff, mypy) and every test except those marked slow (CI runs this)"
	@echo "make test-all  the same plus the slow ones (broker faults, partitions, long runs)"
	@echo "make lint    ruff check + mypy ledger streams"
	@echo "make unit    unit tests only (starts nothing)"
	@echo "make up      start the local stack   |  make down   stop it"
	@echo "make status  show the local stack"

# Python >= 3.11 with venv: python3.11, else python3 if new enough, else apt-get (root).
$(PY):
	@py=""; \
	for candidate in python3.11 python3.12 python3.13 python3; do \
	  if command -v $$candidate >/dev/null 2>&1 && $$candidate -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
	    py=$$candidate; break; fi; \
	done; \
	if [ -z "$$py" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing python3 and python3-venv with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-venv python3-pip >/dev/null; \
	    py=python3; \
	  else \
	    echo "error: need Python >= 3.11 with the venv module (e.g. apt-get install python3-venv)" >&2; exit 1; \
	  fi; \
	fi; \
	echo "creating $(VENV) with $$($$py --version)"; \
	$$py -m venv $(VENV)

$(DEPS_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(DEPS_STAMP)

up: venv
	$(VENV)/bin/capledger dev up

down:
	@if [ -x $(VENV)/bin/capledger ]; then $(VENV)/bin/capledger dev down; else echo "nothing to stop"; fi

status: venv
	$(VENV)/bin/capledger dev status

lint: venv
	$(VENV)/bin/ruff check ledger streams tests migrations
	$(VENV)/bin/mypy ledger streams

unit: venv
	$(VENV)/bin/pytest -q tests/unit $(PYTEST_ARGS)

# The web UI's browser tests drive Debian's chromium through chromedriver (Korean fonts
# for readable screenshots); installed as root when missing, else those tests skip.
BROWSER_PACKAGES := chromium chromium-driver fonts-noto-cjk
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(BROWSER_PACKAGES) with apt-get (browser tests)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BROWSER_PACKAGES) >/dev/null 2>&1 || \
	      { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BROWSER_PACKAGES) >/dev/null; }; \
	  else \
	    echo "note: chromium/chromedriver missing and not root: browser tests will skip" >&2; \
	  fi; \
	fi

# `make test` is what CI runs (bounded well under 30 min); tests marked `slow` (broker
# faults with three brokers, partitions, long runs) only run in `make test-all`.
test: lint up browser
	$(VENV)/bin/pytest -q -m "not slow" --durations=25 $(PYTEST_ARGS)

test-all: lint up browser
	$(VENV)/bin/pytest -q --durations=40 $(PYTEST_ARGS)

# The seed's OTC market scenario through the API server, then its UI until Ctrl-C
# (`capledger demo` is the payments demo of five nodes committing by vote).
demo: up browser
	$(VENV)/bin/capledger api demo
