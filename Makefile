# fastbyol: the two set-up commands of the README, and the benchmark suite.
#   make train   creates .venv/ if missing, installs, runs BYOL on the embedded Fashion-MNIST
#   make test    creates .venv/ if missing, installs, runs the tests
# Without an NVIDIA GPU the CPU build of torch (torch==2.13.0) is installed; with one, the CUDA build.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_NVIDIA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC := $(if $(HAS_NVIDIA),torch,torch==2.13.0)
STAMP := $(VENV)/.fastbyol-installed
# pip's notes about this machine's unused local index folders are noise
QUIET_PIP := grep -v '^WARNING: Location' || true

.PHONY: install train test bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing into $(VENV) ($(TORCH_SPEC), DALI, triton, pytest) ..."
	@set -o pipefail; $(PY) -m pip install -q "$(TORCH_SPEC)" 2>&1 | { $(QUIET_PIP); }
	@set -o pipefail; $(PY) -m pip install -q -e ".[dev,cuda13]" 2>&1 | { $(QUIET_PIP); }
	@touch $@

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/fastbyol train

test: $(STAMP)
	$(PY) -m pytest -q

# pytest-benchmark JSON goes to runs/ (ignored); GPU reports worth keeping go to benchmarks/results/ by hand
bench: $(STAMP)
	@mkdir -p runs
	$(PY) -m pytest benchmarks -q --benchmark-json=runs/bench-latest.json --benchmark-columns=median,rounds

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
