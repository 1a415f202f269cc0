"""``skymoe plan finetune``: its parameter and byte counts against a model built on the meta
device (adapters added by the trainer's own ``add_lora``), and its answer for Skywork-MoE."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import torch

from skymoe.arithmetic import rank_shard
from skymoe.checkpoint.fp8 import is_quantizable
from skymoe.config import resolve_config
from skymoe.model.lora import LoRAConfig, add_lora, lora_parameters
from skymoe.model.transformer import SkyworkForCausalLM
from skymoe.planning.finetune import finetune_memory, lora_layer_params, plan_finetune

GIB = 2**30


def _meta_model(config) -> SkyworkForCausalLM:
    with torch.device("meta"):
        return SkyworkForCausalLM(config)


def test_adapter_counts_match_the_adapters_add_lora_builds():
    for preset, targets in (("skywork-moe-base", ("q_proj", "k_proj", "v_proj", "o_proj",
                                                  "experts")),
                            ("tiny-dense", ("q_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"))):
        config = resolve_config(preset)
        if preset == "skywork-moe-base":  # two of its layers: the same per-layer shapes
            config = dataclasses.replace(config, num_hidden_layers=2)
        model = _meta_model(config)
        add_lora(model, LoRAConfig(rank=8, targets=targets))
        built = sum(p.numel() for p in lora_parameters(model).values())
        whole = rank_shard(config)
        planned = sum(lora_layer_params(config, layer, 8, targets) for layer in whole.layers)
        assert planned == built > 0, preset


def test_base_bytes_match_the_models_tensors_in_each_dtype():
    config = resolve_config("skywork-moe-base")
    model = _meta_model(config)
    numel = sum(p.numel() for p in model.parameters())
    # FP8 (Skywork-MoE-FP8's convention): the quantizable projections at one byte plus one
    # fp32 scale per projection (per expert and matrix); everything else in bf16.
    fp8 = 0
    for name, p in model.named_parameters():
        if name.endswith(".experts.w13") or name.endswith(".experts.w2"):
            tensors = p.shape[0] * (2 if name.endswith("w13") else 1)
            fp8 += p.numel() + 4 * tensors
        elif is_quantizable(name):
            fp8 += p.numel() + 4
        else:
            fp8 += 2 * p.numel()
    expected = {"bf16": 2 * numel, "fp32": 4 * numel, "fp8": fp8}
    for dtype, want in expected.items():
        got = finetune_memory(config, 1, 1, "lora", dtype, seq_len=128)
        assert got.weights == want, dtype
    full = finetune_memory(config, 4, 1, "full", seq_len=128)
    assert full.weights == full.gradients == 4 * numel
    assert full.optimizer == 8 * numel // 4 and full.adapters == 0


def test_skywork_moe_lora_fits_eight_80gb_gpus_and_full_fine_tuning_does_not():
    config = resolve_config("skywork-moe-base")
    fp8 = plan_finetune(config, 8, 80 * GIB, method="lora", base_dtype="fp8")
    bf16 = plan_finetune(config, 8, 80 * GIB, method="lora", base_dtype="bf16")
    full = plan_finetune(config, 8, 80 * GIB, method="full")
    assert fp8.fits and bf16.fits and not full.fits
    # The FP8 base needs about half the bf16 base's weight bytes on every layout.
    for a, b in zip(fp8.options, bf16.options):
        assert 0.45 < a.weights / b.weights < 0.55
    assert fp8.smallest_fit.gpus < bf16.smallest_fit.gpus < 8 < full.smallest_fit.gpus


def test_cli_prints_the_layouts_and_the_verdict():
    out = subprocess.run([sys.executable, "-m", "skymoe", "plan", "finetune",
                          "skywork-moe-base", "--gpus", "8", "--base-dtype", "fp8"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| 1 x 8 |" in out.stdout and "fits: " in out.stdout
    bad = subprocess.run([sys.executable, "-m", "skymoe", "plan", "finetune", "tiny", "--gpus",
                          "2", "--targets", "q_proj,nope"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_expert_parallel_layouts_count_what_the_sharded_model_holds():
    """dp 4 with the experts over ep 4: the weights and adapters of rank 0 as the trainer's own
    placements cut them, and the experts' AdamW moments split over dp / ep replicas."""
    from skymoe.parallel.layout import ParallelLayout
    from skymoe.parallel.placement import placement

    config = dataclasses.replace(resolve_config("skywork-moe-base"), num_hidden_layers=2)
    layout = ParallelLayout(dp=4, ep=4)
    model = _meta_model(config)
    add_lora(model, LoRAConfig(rank=16))
    held = {"base": 0, "dense adapters": 0, "expert adapters": 0}
    for name, p in model.named_parameters():
        place = placement(name, config, layout, layout.coords(0))
        n = torch.Size(place.local_shape(tuple(p.shape))).numel()
        kind = "base" if not p.requires_grad else (
            "expert adapters" if ".experts." in name else "dense adapters")
        held[kind] += n
    got = finetune_memory(config, 4, 1, "lora", "bf16", rank=16, seq_len=128, ep=4)
    assert got.weights == 2 * held["base"]
    assert got.adapters == 4 * (held["dense adapters"] + held["expert adapters"])
    assert got.optimizer == 8 * held["dense adapters"] // 4 + 8 * held["expert adapters"]
    one = finetune_memory(config, 4, 1, "lora", "bf16", rank=16, seq_len=128)
    assert got.activations == one.activations and got.weights < one.weights / 2
