# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment and install the project first if needed.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
RUN_DIR ?= runs/digits-teacher

.PHONY: setup demo test

$(BIN)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/kd train-teacher --out $(RUN_DIR) --overwrite
	$(BIN)/kd cmatrix show $(RUN_DIR)/cmatrix.safetensors

test: setup
	$(BIN)/pytest -q
