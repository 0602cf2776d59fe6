# Every target bootstraps .venv from nothing: a fresh machine needs only Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint venv system-deps clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,fast]'
	touch $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

test: venv system-deps
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/meshproxy demo

bench: venv
	MESHPROXY_BENCH_DEPS=1 bash scripts/system-deps.sh
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: venv
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check meshproxy l4 l7 discovery bench tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
