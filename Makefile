PYTHON ?= python3
# torch 2.13.0 on this kind of machine resolves to the CPU wheel on local disk; a GPU user installs their CUDA build first.
TORCH ?= torch==2.13.0

.PHONY: install test lint demo bench

install:
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[dev]"

test: install
	$(PYTHON) -m ruff check iedp tests bench
	$(PYTHON) -m pytest -q -x

lint:
	$(PYTHON) -m ruff check iedp tests bench
	$(PYTHON) -m ruff format --check iedp tests bench

demo: install
	iedp demo --out demo_out
