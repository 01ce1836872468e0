# rnntool: `make demo` runs the main job on the sample data, `make test` the suite.
# Both install what they need into .venv first (torch's CPU wheel before anything
# that depends on torch, so pip never downloads a multi-GB CUDA build).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
BENCH := .bench
PIP_QUIET := -q --disable-pip-version-check

.PHONY: install test lint demo bench bench-env clean gpu-wheels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install $(PIP_QUIET) torch==2.13.0
	$(BIN)/pip install $(PIP_QUIET) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

demo: install
	$(BIN)/rnntool score sample_data/speech/speech.h5
	$(BIN)/rnntool align sample_data/speech/speech-lattice.h5 --utt heldout000 -q -f tsv | cut -f1,4,5
	$(BIN)/rnntool score sample_data/sample.h5 -q -f tsv | cut -f1,4 | head -4

# A separate, large (~6 GB) environment with torchaudio and warprnnt_numba beside
# rnntool, for benchmarks/ only. torch 2.14.1 lies on this machine's disk.
$(BENCH)/.stamp: pyproject.toml
	test -x $(BENCH)/bin/python || $(PY) -m venv $(BENCH)
	$(BENCH)/bin/pip install $(PIP_QUIET) torch==2.14.1 warprnnt-numba -e .
	$(BENCH)/bin/pip install $(PIP_QUIET) --no-deps torchaudio==2.11.0
	touch $@

bench-env: $(BENCH)/.stamp

bench: bench-env
	$(BENCH)/bin/python benchmarks/bench_loss.py

clean:
	rm -rf $(VENV) $(BENCH) .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +

# Wheels that the GPU machine lacks (it has no package registry), for scripts/gpu_check.sh.
WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64
gpu-wheels:
	mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp $(WHEEL_PLATFORMS) -d .whl \
	  pytest pluggy iniconfig packaging hypothesis attrs sortedcontainers warprnnt-numba
