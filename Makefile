# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use with the CPU build of PyTorch pinned here; the package
# itself only asks for a torch range.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,hf,data]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/bmojo demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests

bench: $(VENV)/.installed
	$(BIN)/bmojo bench ops

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
