# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The sample the demo runs on: size and seed.
SAMPLE_DIR ?= data/sample
SAMPLE_N ?= 2000
SAMPLE_SEED ?= 0

.PHONY: install demo test test-fast clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

$(SAMPLE_DIR)/list_attr_celeba.txt: | $(VENV)/.installed
	$(BIN)/python -m jobs.make_sample --out $(SAMPLE_DIR) --n $(SAMPLE_N) --seed $(SAMPLE_SEED)

demo: $(VENV)/.installed $(SAMPLE_DIR)/list_attr_celeba.txt
	$(BIN)/python -m jobs.run --config jobs/configs/demo.toml

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf runs data/sample
