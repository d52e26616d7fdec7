# Each target sets up its own virtual environment, so both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first and pinned, so pip does not pull a different (multi-gigabyte) build for the other packages.
TORCH_SPEC ?= torch==2.13.0

BIN := $(VENV)/bin

.PHONY: setup test clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

setup: $(BIN)/activate
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
