# `make test` and `make demo` each create .venv and install what they need when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_FLAGS := --quiet --disable-pip-version-check

TFLITE_VENV := .venv-tflite
TFLITE_STAMP := $(TFLITE_VENV)/.installed

.PHONY: test test-tflite demo lint format clean

# the bench extra too: the tests import every script in benchmarks/
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

# The TFLite extra (about 1.2 GB, and it pins older typing-extensions) lives in its own venv, so
# `make test` stays free of it; its tests are skipped there and run here.
$(TFLITE_STAMP): pyproject.toml constraints.txt
	test -x $(TFLITE_VENV)/bin/python || $(PYTHON) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt -e '.[test,tflite]'
	touch $(TFLITE_STAMP)

test-tflite: $(TFLITE_STAMP)
	$(TFLITE_VENV)/bin/python -m pytest tests/test_tflite.py tests/test_targets.py

demo: $(STAMP)
	$(BIN)/blockscale demo --out demo-out

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(TFLITE_VENV) demo-out .pytest_cache .ruff_cache
