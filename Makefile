# skymoe: `make run` sets everything up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here so CPU-only machines take the local CPU wheel; pyproject.toml keeps a
# range (torch>=2.10) so GPU users can bring their own CUDA build (see README).
TORCH_PIN ?= torch==2.13.0
RUN_DIR ?= runs/default

.PHONY: setup run test bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# Trains the embedded default; run again, it resumes (a finished run just reports its result).
run: setup
	$(BIN)/skymoe train --run-dir $(RUN_DIR) $$(test -d $(RUN_DIR)/checkpoints && echo --resume)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs .pytest_cache
