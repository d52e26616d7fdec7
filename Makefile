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
	$(BIN)/pip install --quiet -e ".[test,data,eval]"
	# lmms-eval pins torchvision and would replace torch, so it goes in without its dependencies (the eval extra
	# lists the ones it needs).
	$(BIN)/pip install --quiet --no-deps "lmms-eval==0.7.3"

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
