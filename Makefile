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

# Written beside and moved into place: an interrupted `make demo` never leaves a half sample
# that the next one would take for complete.
$(SAMPLE_DIR)/list_attr_celeba.txt: | $(VENV)/.installed
	rm -rf $(SAMPLE_DIR).tmp
	$(BIN)/python -m jobs.make_sample --out $(SAMPLE_DIR).tmp --n $(SAMPLE_N) --seed $(SAMPLE_SEED)
	rm -rf $(SAMPLE_DIR) && mv $(SAMPLE_DIR).tmp $(SAMPLE_DIR)

demo: $(VENV)/.installed $(SAMPLE_DIR)/list_attr_celeba.txt
	$(BIN)/python -m jobs.run --config jobs/configs/demo.toml

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf runs data/sample
