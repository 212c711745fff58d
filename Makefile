# make test : create .venv, install curvsafe with its pinned CPU stack and test oracles, run the whole suite.
# make demo : the smallest real end-to-end example (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.curvsafe-installed
# Pins known to work on the CPU machines: torch 2.13.0 (CPU wheel), triton 3.7.1.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.7.1

.PHONY: test demo install bench clean

$(STAMP): setup.py requirements-test.txt requirements-oracles.txt csrc/curvsafe_kernels.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel ninja pybind11
	$(PIP) install -q "$(TORCH_PIN)" "$(TRITON_PIN)"
	$(PIP) install -q -r requirements-test.txt
	# test oracles without their deps: a plain install drags in torchvision and a CUDA torch
	$(PIP) install -q --no-deps -r requirements-oracles.txt
	$(PIP) install -q --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/curvsafe demo --out out/demo

bench: $(STAMP)
	$(PY) benchmarks/kernels.py --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info kernels/_C*.so
