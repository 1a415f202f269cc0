"""Non-uniform tensor-parallel inference (gloo processes): uneven head splits, experts split
along the intermediate size, the vocabulary padded to a multiple of 24 and split evenly, its
shards gathered for sampling, per-rank KV caches; the same logits and greedy tokens as one
process, for bf16-widened FP8 weights too."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from skymoe.checkpoint import load_model, save_byte_tokenizer, save_model
from skymoe.checkpoint.tokenizer import BYTE_VOCAB_SIZE
from skymoe.config import SkyworkMoeConfig
from skymoe.infer.generate import generate
from skymoe.model.transformer import build_model
from skymoe.parallel.apply import parallelize
from skymoe.parallel.layout import ParallelLayout
from skymoe.parallel.mesh import build_mesh
from skymoe.quantize import quantize_checkpoint

from distributed import free_port, spawn


def _config() -> SkyworkMoeConfig:
    # 5 heads divide by none of 2, 3, 4 (3,2 / 2,2,1 / 2,1,1,1); vocab 61 and intermediate 22
    # split unevenly too.
    return SkyworkMoeConfig(vocab_size=61, hidden_size=40, intermediate_size=22,
                            num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=5,
                            num_experts=4, num_experts_per_tok=2, moe_expert_interval=2,
                            max_position_embeddings=64, torch_dtype="float32")


def _worker(rank: int, world: int, fp8_dir: str | None) -> None:
    if fp8_dir:
        full = load_model(fp8_dir, dtype=torch.float32)  # FP8 modules, bf16-widened values
    else:
        full = build_model(_config(), seed=0, dtype=torch.float32).eval()
    sharded = copy.deepcopy(full)
    mesh = build_mesh(ParallelLayout(tp=world, etp=world))
    parallelize(sharded, mesh, gather_logits=True, vocab_multiple=24)
    heads = {2: [3, 2], 3: [2, 2, 1], 4: [2, 1, 1, 1]}[world][rank]
    assert sharded.new_kv_cache(1, 4).keys[0].shape[1] == heads  # this rank's KV heads
    # Vocabulary 61 padded to 72: equal shards, the padding (zero rows) on the last rank.
    rows = sharded.lm_head.weight.shape[0]
    assert rows == 72 // world == sharded.model.embed_tokens.weight.shape[0]
    padding = sharded.lm_head.weight[61 - rank * rows:] if (rank + 1) * rows > 61 else None
    if padding is not None:
        assert len(padding) == (rank + 1) * rows - 61 and not padding.any()
    prompt = torch.randint(61, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = full(prompt).logits, sharded(prompt).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(sharded, prompt, 10), generate(full, prompt, 10))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_tensor_parallel_inference_matches_one_process(world):
    spawn(_worker, world, None)


def test_tensor_parallel_inference_with_fp8_weights(tmp_path):
    save_model(build_model(_config(), seed=0, dtype=torch.float32), tmp_path / "model")
    out = quantize_checkpoint(tmp_path / "model", tmp_path / "fp8", show_progress=False)
    spawn(_worker, 2, str(out))


def test_generate_under_torchrun_prints_what_one_process_prints(tmp_path):
    config = _config()
    config.vocab_size = BYTE_VOCAB_SIZE
    save_model(build_model(config, seed=0, dtype=torch.float32), tmp_path / "m")
    save_byte_tokenizer(tmp_path / "m")
    args = ["-m", "skymoe", "generate", str(tmp_path / "m"), "--prompt", "hello",
            "--max-new-tokens", "12", "--temperature", "0.8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--seed", "3"], capture_output=True,
                         text=True, env=env)
    tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                         "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                         *args, "--seed", "3", "--tp", "2"], capture_output=True, text=True,
                        env=env)
    assert one.returncode == 0 and tp.returncode == 0, tp.stderr[-2000:]
    assert tp.stdout == one.stdout and one.stdout.startswith("hello")
