# Every target that runs code first creates or refreshes .venv (see `venv`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch; users with GPUs install their own CUDA build before `pip install .`.
TORCH_PIN := torch==2.13.0

.PHONY: venv demo test bench train evaluate clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_PIN)"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m node.demo --analyze

test: $(STAMP)
	bash .ci/install-tools
	$(PY) -m pytest -q

bench: $(STAMP)
	bash .ci/install-tools
	$(PY) bench/ingest.py
	$(PY) bench/pipeline.py

train: $(STAMP)
	$(PY) -m models.train
	$(PY) -m models.train_candidates

evaluate: $(STAMP)
	$(PY) -m models.evaluate

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
