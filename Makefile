# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment and install the project first if needed.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
RUNS ?= runs/digits

.PHONY: setup demo test

$(BIN)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

setup: $(BIN)/.installed

# Teacher with LS++ -> its C-matrix -> three students (proxy C-matrix, classic KD, plain) -> table.
demo: setup
	$(BIN)/kd train-teacher --out $(RUNS)/teacher --overwrite
	$(BIN)/kd cmatrix show $(RUNS)/teacher/cmatrix.safetensors
	$(BIN)/kd distill --proxy $(RUNS)/teacher/cmatrix.safetensors --model tiny_cnn --out $(RUNS)/student-proxy --overwrite
	$(BIN)/kd distill --teacher $(RUNS)/teacher --model tiny_cnn --out $(RUNS)/student-kd --overwrite
	$(BIN)/kd distill --model tiny_cnn --out $(RUNS)/student-plain --overwrite
	$(BIN)/kd compare $(RUNS)/teacher $(RUNS)/student-proxy $(RUNS)/student-kd $(RUNS)/student-plain \
		--markdown $(RUNS)/compare.md --csv $(RUNS)/compare.csv

# Two workers: on two cores the suite takes about 8 minutes instead of 12 (tests wait on
# subprocesses and file I/O). `pytest -n 0` runs it in one process.
test: setup
	$(BIN)/pytest -q -n 2
