# Every target bootstraps .venv from nothing: a fresh machine needs only Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint venv system-deps clean

# The compiled L7 core (l7.compiled, docs/l7.md "Compiled core"), rebuilt in place whenever one of
# its sources changes (an editable install does not notice). Optional: without Cython or a C
# compiler the build says so, nothing fails, and the pure-Python core runs.
CORE_SRC := setup.py l7/h1grammar.py l7/h1parser.py l7/h1request.py l7/h1response.py l7/h1writer.py \
	l7/headers.py l7/compiled/_h1scan.pyx
CORE_STAMP := $(VENV)/.compiled

venv: $(STAMP) $(CORE_STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

$(CORE_STAMP): $(STAMP) $(CORE_SRC)
	$(BIN)/python -m pip install -q 'Cython>=3.0,<4' || echo "meshproxy: Cython not installed; the pure-Python core runs"
	$(BIN)/python setup.py -q build_ext --inplace 2>&1 | grep -v -i warn || true
	$(BIN)/python -c "from l7 import h1impl; print('meshproxy: L7 compiled core:', h1impl.compiled_status())"
	touch $(CORE_STAMP)

system-deps:
	@bash scripts/system-deps.sh

# One pytest run. The L7 suites run under both parser modes (the parse_whole fast paths and the
# general parser only: the fast paths must not change any verdict, docs/http.md "Fast path") as a
# pytest parameter (tests/conftest.py, PARSER_SUITES); both L7 cores (compiled and pure Python)
# are a parameter of the parser, header and smuggling tests (tests/cores.py), and
# tests/test_differential.py holds them to the same answers.
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
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache l7/compiled/*.so
