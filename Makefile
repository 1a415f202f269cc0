# skymoe: `make run` sets everything up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here so CPU-only machines take the local CPU wheel; pyproject.toml keeps a
# range (torch>=2.10) so GPU users can bring their own CUDA build (see README).
TORCH_PIN ?= torch==2.13.0
RUN_DIR ?= runs/default
FINETUNE_DIR ?= runs/finetune
SFT_DATA ?= runs/sft-example.jsonl

.PHONY: setup run finetune test bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

setup: $(BIN)/.installed

# Trains the embedded default; run again, it resumes (a finished run just reports its result).
run: setup
	$(BIN)/skymoe train --run-dir $(RUN_DIR) $$(test -d $(RUN_DIR)/checkpoints && echo --resume)

# LoRA chat fine-tuning of the default run's model on the embedded example (docs/finetuning.md).
finetune: run
	test -f $(SFT_DATA) || $(BIN)/skymoe data sft-example $(SFT_DATA)
	$(BIN)/skymoe train --run-dir $(FINETUNE_DIR) --set model.init_from=$(RUN_DIR) \
	  --set data.format=sft --set 'data.sources=["$(SFT_DATA)"]' \
	  --set lora.enabled=true --set lora.base_dtype=fp32 --set train.precision=fp32 \
	  --set train.steps=200 --set train.lr=2e-3 --set train.warmup_steps=10 \
	  --set train.eval_every=50 --set train.checkpoint_every=100 \
	  --set 'train.sample_prompt=Write the Python function `ispackage` of module `pydoc`: Guess whether a path refers to a package directory.' \
	  $$(test -d $(FINETUNE_DIR)/checkpoints && echo --resume)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs .pytest_cache
