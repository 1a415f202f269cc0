"""`skymoe plan serve`: the real Skywork-MoE deployment facts and hand-checked arithmetic."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from skymoe.config import SkyworkMoeConfig, resolve_config
from skymoe.errors import ConfigError
from skymoe.model.transformer import SkyworkForCausalLM
from skymoe.planning.serving import (GIB, GPU_PRESETS, GpuSpec, decode_step_s, padded_vocab,
                                     plan_serve)

RTX_4090 = GPU_PRESETS["4090"]


@pytest.fixture(scope="module")
def skywork():
    return resolve_config("skywork-moe-base")


def test_skywork_does_not_fit_on_four_or_six_24gib_gpus(skywork):
    for gpus in (4, 6):
        plan = plan_serve(skywork, gpus, RTX_4090, "fp8")
        assert not plan.fits, gpus


def test_skywork_fits_on_eight_with_the_uneven_head_split(skywork):
    plan = plan_serve(skywork, 8, RTX_4090, "fp8")
    assert plan.fits
    assert [r.q_heads for r in plan.ranks] == [5, 5, 5, 5, 4, 4, 4, 4]
    assert [r.kv_heads for r in plan.ranks] == [5, 5, 5, 5, 4, 4, 4, 4]
    assert plan.vocab == 65544 and plan.vocab % 8 == 0
    weights = max(r.weight_bytes for r in plan.ranks) / GIB
    assert 17.0 < weights < 17.4  # docs/inference.md: about 17.2 GiB per GPU
    free = min(r.free_bytes for r in plan.ranks) / GIB
    assert 4.8 < free < 5.6  # about 5 GiB left for the KV cache
    # bf16 KV of the whole model: 2 (k, v) x 52 layers x 36 heads x 128 dims x 2 bytes
    assert sum(r.kv_bytes_per_token for r in plan.ranks) == 2 * 52 * 36 * 128 * 2
    assert 38_000 < plan.kv_tokens < 46_000  # "about 40k cached tokens"


def test_padded_vocab_divides_common_gpu_counts():
    assert padded_vocab(65532) == 65544
    assert all(padded_vocab(65532) % n == 0 for n in (1, 2, 3, 4, 6, 8, 12))
    assert padded_vocab(48) == 48


def _independent_bytes(config: SkyworkMoeConfig) -> int:
    """fp8 bytes of one full copy, classified from the model's own parameter names."""
    with torch.device("meta"):
        model = SkyworkForCausalLM(config)
    total = 0
    for name, p in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            total += p.numel() + 4  # fp8 values + one fp32 scale
        elif name.endswith((".w13", ".w2")):
            per_expert = 2 if name.endswith(".w13") else 1  # w1 and w3, or w2
            total += p.numel() + 4 * per_expert * p.shape[0]
        else:
            rows = padded_vocab(config.vocab_size) if "embed" in name or "lm_head" in name \
                else None
            n = rows * p.shape[1] if rows else p.numel()
            total += 2 * n  # bf16
    return total


def test_single_gpu_weight_bytes_match_the_model_parameters():
    config = resolve_config("tiny")
    plan = plan_serve(config, 1, RTX_4090, "fp8")
    assert plan.ranks[0].weight_bytes == _independent_bytes(config)


def test_ranks_add_up_to_the_whole_model_plus_replicated_parts():
    config = resolve_config("tiny")
    one = plan_serve(config, 1, RTX_4090, "fp8").ranks[0].weight_bytes
    two = sum(r.weight_bytes for r in plan_serve(config, 2, RTX_4090, "fp8").ranks)
    h, e, layers = config.hidden_size, config.num_experts, config.num_hidden_layers
    replicated = 2 * (layers * (2 * h + h * e) + h)  # norms, routers and final norm in bf16
    scales = 4 * layers * (4 + 3 * e)  # every rank keeps a scale per quantized tensor
    assert two - one == replicated + scales


def test_decode_step_by_hand_on_one_gpu():
    config = resolve_config("tiny")
    gpu = GpuSpec(memory=24 * GIB, bandwidth=1e12, link_bandwidth=1e10, all_reduce_latency=1e-5)
    plan = plan_serve(config, 1, gpu, "bf16", context=100)
    rank = plan.ranks[0]
    batch = 512  # every expert is touched: 1 - (1 - 2/8)^512 == 1 in floating point
    want = (rank.weight_bytes + batch * 100 * rank.kv_bytes_per_token) / 1e12
    assert decode_step_s(plan, batch) == pytest.approx(want, rel=1e-12)
    # a single token streams only its top-k experts
    moe_bytes = config.num_hidden_layers * config.num_experts * 3 * config.hidden_size \
        * config.intermediate_size * 2
    one = (rank.weight_bytes - moe_bytes * (1 - 2 / 8) + 100 * rank.kv_bytes_per_token) / 1e12
    assert decode_step_s(plan, 1) == pytest.approx(one, rel=1e-12)


def test_throughput_grows_with_batch(skywork):
    plan = plan_serve(skywork, 8, RTX_4090, "fp8", context=512)
    rates = [p.tokens_per_s for p in plan.decode]
    assert rates == sorted(rates)
    at_64 = next(p for p in plan.decode if p.batch == 64)
    # Skywork-MoE's report: ~2200 tok/s needs 50-70 sequences.
    assert 1500 < at_64.tokens_per_s < 3000


def test_bad_requests():
    config = resolve_config("tiny")
    with pytest.raises(ConfigError, match="exceed the 4 KV heads"):
        plan_serve(config, 5, RTX_4090)
    with pytest.raises(ConfigError, match="--dtype"):
        plan_serve(config, 1, RTX_4090, "int3")
    with pytest.raises(ConfigError, match="--gpus"):
        plan_serve(config, 0, RTX_4090)


def test_cli():
    run = [sys.executable, "-m", "skymoe", "plan", "serve", "--model", "skywork-moe-base"]
    out = subprocess.run(run + ["--gpus", "8", "--gpu-mem", "24GiB"], capture_output=True,
                         text=True, check=True).stdout
    assert "query 5,5,5,5,4,4,4,4" in out and "fits:" in out and "output tok/s" in out
    out = subprocess.run(run + ["--gpus", "6"], capture_output=True, text=True).stdout
    assert "does not fit" in out
    bad = subprocess.run(run + ["--gpus", "8", "--gpu-mem", "lots"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "size 'lots'" in bad.stderr
