# `make test` and `make demo` create or reuse .venv by themselves (torch first, then the project).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peft-lab-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# style (ruff: lint rules, complexity <= 15, 120 columns, formatting) and the import graph (no cycles, one-way layers)
lint: $(STAMP)
	$(PY) -m ruff check peft_lab merging tests benchmarks
	$(PY) -m ruff format --check peft_lab merging tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider tests/test_layering.py

demo: $(STAMP)
	$(PY) -m peft_lab.demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist *.egg-info
