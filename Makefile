# AlphaPulse-RL: everything a fresh machine needs goes through these targets.
#   make run     create .venv, install, paper-trade the bundled replay (Ctrl-C stops cleanly)
#   make test    install with test extras and run the whole suite
#   make bench   latency / start-up / memory benchmark -> .bench/latest.json
#   make lint    ruff + mypy

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install dev run test bench lint tools clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The package and its console script.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(PIP) install -q -e .
	touch $@

# Test and lint tools on top.
$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) install -q -e '.[test,dev,train,ccxt]'
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

run: install
	$(BIN)/alphapulse run

# Tools some tests need (systemd-analyze, promtool); the script installs them with apt when missing.
tools:
	@bash scripts/install_test_tools.sh

test: dev tools
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: dev
	$(BIN)/python scripts/bench.py

lint: dev
	$(BIN)/ruff check alphapulse tests scripts
	$(BIN)/mypy alphapulse

clean:
	rm -rf $(VENV) .bench .pytest_cache .mypy_cache .ruff_cache build *.egg-info var
