# skymoe: `make run` sets everything up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here so CPU-only machines take the local CPU wheel; pyproject.toml keeps a
# range (torch>=2.6) so GPU users can bring their own CUDA build (see README).
TORCH_PIN ?= torch==2.13.0
RUN_DIR ?= runs/tiny

.PHONY: setup run test bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/skymoe init --config tiny $(RUN_DIR) --overwrite
	$(BIN)/skymoe info $(RUN_DIR)
	$(BIN)/skymoe generate $(RUN_DIR) --prompt "The mixture of experts" --max-new-tokens 32 \
		--temperature 0.8 --top-p 0.95 --seed 0

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV) runs .pytest_cache
