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
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

# The L7 suites run a second time with the general parser only (--http-parser strict): the
# parse_whole fast paths must not change any verdict (docs/http.md, "Fast path").
L7_SUITES := tests/test_l7.py tests/test_l7_unit.py tests/test_smuggling_e2e.py tests/test_headers.py tests/test_retries.py

test: venv system-deps
	$(BIN)/python -m pytest -q
	MESHPROXY_HTTP_PARSER=strict $(BIN)/python -m pytest -q $(L7_SUITES)

demo: venv
	$(BIN)/meshproxy demo

bench: venv
	MESHPROXY_BENCH_DEPS=1 bash scripts/system-deps.sh
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: venv
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check meshproxy l4 l7 discovery bench tests
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
