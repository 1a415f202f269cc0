"""``skymoe.arithmetic`` against meta-device models: every count and shard size here is read
from ``SkyworkForCausalLM`` built on ``torch.device("meta")`` and cut by the real sharding
rules (``skymoe.parallel.placement.placement``), never from the arithmetic under test."""

from __future__ import annotations

import re

import pytest
import torch

from skymoe.arithmetic import (flops_per_token, parameter_counts, rank_shard, rank_weight_bytes,
                               router_params)
from skymoe.config import SkyworkMoeConfig
from skymoe.config import parameter_counts as config_parameter_counts
from skymoe.model.transformer import SkyworkForCausalLM
from skymoe.parallel.layout import ParallelLayout
from skymoe.parallel.placement import placement


def _config(**changes) -> SkyworkMoeConfig:
    base = dict(vocab_size=101, hidden_size=48, intermediate_size=40, num_hidden_layers=4,
                num_attention_heads=6, num_key_value_heads=6, num_experts=4,
                num_experts_per_tok=2)
    return SkyworkMoeConfig(**{**base, **changes})


CONFIGS = {
    "dense": _config(num_experts=0),
    "moe": _config(),
    "two-layer gate": _config(moe_2layer_gate=True),
    "tied": _config(tie_word_embeddings=True),
    "moe every 2nd layer, GQA": _config(moe_expert_interval=2, num_key_value_heads=3),
    "uneven": _config(num_hidden_layers=3, num_key_value_heads=3, intermediate_size=41,
                      moe_expert_interval=3, tie_word_embeddings=True),
}
LAYOUTS = {
    "single": ParallelLayout(),
    "tp2": ParallelLayout(tp=2),
    "tp3 dp2": ParallelLayout(dp=2, tp=3),
    "ep (dp2 tp2 ep4)": ParallelLayout(dp=2, tp=2, ep=4),
    "edp (dp2 tp2 ep2)": ParallelLayout(dp=2, tp=2, ep=2),
    "etp (dp2 tp2 ep2 etp2)": ParallelLayout(dp=2, tp=2, ep=2, etp=2),
    "pp2 tp2": ParallelLayout(pp=2, tp=2),
}


def _meta_model(config: SkyworkMoeConfig) -> SkyworkForCausalLM:
    with torch.device("meta"):
        return SkyworkForCausalLM(config)


def _kind(name: str) -> tuple[int | None, str]:
    """(decoder layer or None, part) of a parameter name."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)$", name)
    if not m:
        return None, {"model.embed_tokens.weight": "embedding", "lm_head.weight": "lm_head",
                      "model.norm.weight": "final_norm"}[name]
    rest = m[2]
    for part, pattern in (("attention", r"self_attn\."), ("norms", r"layernorm"),
                          ("router", r"block_sparse_moe\.gate"), ("mlp", r"mlp\."),
                          ("experts", r"block_sparse_moe\.experts")):
        if re.search(pattern, rest):
            return int(m[1]), part
    raise AssertionError(name)


def _meta_shard(model: SkyworkForCausalLM, config: SkyworkMoeConfig, layout: ParallelLayout,
                rank: int, vocab_multiple: int = 1) -> dict:
    """Per (layer, part) the elements ``rank`` holds, and its dense / expert totals (tied
    weights once), from the meta model and ``placement``."""
    coords = layout.coords(rank)
    parts: dict = {}
    dense = expert = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        where = placement(name, config, layout, coords, vocab_multiple)
        n = 1
        for size in where.local_shape(tuple(p.shape)):
            n *= size
        key = _kind(name)
        parts[key] = parts.get(key, 0) + n
    for name, p in model.named_parameters():  # each tensor once
        where = placement(name, config, layout, coords, vocab_multiple)
        n = 1
        for size in where.local_shape(tuple(p.shape)):
            n *= size
        if where.expert:
            expert += n
        else:
            dense += n
    return {"parts": parts, "dense": dense, "expert": expert}


@pytest.mark.parametrize("config_name", CONFIGS)
def test_parameter_counts_match_the_meta_model(config_name):
    config = CONFIGS[config_name]
    model = _meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for name, p in model.named_parameters()
                    if name in ("model.embed_tokens.weight", "lm_head.weight"))
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    # A token passes through top_k of the E experts of each MoE layer.
    inactive = (experts * (config.num_experts - config.num_experts_per_tok)
                // config.num_experts if config.num_experts else 0)
    counts = parameter_counts(config)
    assert counts == config_parameter_counts(config)
    assert counts["total"] == total
    assert counts["embedding"] == embedding
    assert counts["active"] == total - inactive
    assert counts["active_non_embedding"] == total - inactive - embedding


@pytest.mark.parametrize("config_name", CONFIGS)
def test_router_size_matches_the_meta_model(config_name):
    config = CONFIGS[config_name]
    model = _meta_model(config)
    routers = {_kind(name)[0]: 0 for name, _ in model.named_parameters()
               if "block_sparse_moe.gate" in name}
    for name, p in model.named_parameters():
        if "block_sparse_moe.gate" in name:
            routers[_kind(name)[0]] += p.numel()
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    assert sorted(routers) == moe_layers
    assert all(n == router_params(config) for n in routers.values())


@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_rank_shards_match_placement_on_the_meta_model(config_name, layout_name):
    config, layout = CONFIGS[config_name], LAYOUTS[layout_name]
    try:
        layout.validate(config=config)
    except Exception:  # e.g. EP on a dense model: no such deployment
        pytest.skip(f"{layout_name} does not apply to {config_name}")
    model = _meta_model(config)
    for rank in range(layout.world_size):
        for multiple in (1, 24):
            want = _meta_shard(model, config, layout, rank, multiple)
            shard = rank_shard(config, layout, rank, multiple)
            got = {(None, "embedding"): shard.embedding, (None, "lm_head"): shard.lm_head,
                   (None, "final_norm"): shard.final_norm}
            for i, layer in enumerate(shard.layers):
                got[(i, "attention")] = layer.attention
                got[(i, "norms")] = layer.norms
                if layer.moe:
                    got[(i, "router")] = layer.router
                    got[(i, "experts")] = layer.expert_total
                else:
                    got[(i, "mlp")] = layer.mlp
            assert got == want["parts"], (rank, multiple)
            assert (shard.dense, shard.expert) == (want["dense"], want["expert"]), (rank, multiple)


def test_pipeline_stage_shard_is_its_layers():
    # A pipeline rank holds a contiguous run of layers: its shard is their sum, whatever its
    # pipeline coordinate (the tensor/expert coordinates alone decide the cut).
    config, layout = CONFIGS["moe every 2nd layer, GQA"], ParallelLayout(pp=2, tp=3, dp=2,
                                                                         ep=2)
    model = _meta_model(config)
    for rank in range(layout.world_size):
        want = _meta_shard(model, config, layout, rank)["parts"]
        shard = rank_shard(config, layout, rank)
        for first, end in ((0, 2), (2, 4), (1, 4)):
            stage = sum(v for (layer, _), v in want.items()
                        if layer is not None and first <= layer < end)
            assert sum(layer.total for layer in shard.layers[first:end]) == stage


@pytest.mark.parametrize("config_name", CONFIGS)
def test_flops_per_token_is_twice_the_active_matmul_weights_plus_attention(config_name):
    # Matmul weights from the meta model: every 2-D or 3-D weight but the embedding (a
    # gather), experts at top_k / E; plus the causal scores and values, 2 x heads x head size
    # x seq_len per token.
    config, seq = CONFIGS[config_name], 96
    matmul = 0.0
    for name, p in _meta_model(config).named_parameters(remove_duplicate=False):
        if p.ndim < 2 or name == "model.embed_tokens.weight":
            continue
        scale = config.num_experts_per_tok / config.num_experts if ".experts." in name else 1
        matmul += p.numel() * scale
    scores = config.num_hidden_layers * 2 * config.num_attention_heads * config.head_size * seq
    assert flops_per_token(config, seq) == pytest.approx(2 * matmul + scores, rel=1e-12)


def test_weight_bytes_price_each_part_of_the_shard():
    config = CONFIGS["moe every 2nd layer, GQA"]
    layout = ParallelLayout(tp=3, etp=3)
    model = _meta_model(config)
    for rank in range(3):
        want = 0
        for name, p in model.named_parameters():
            where = placement(name, config, layout, layout.coords(rank), 24)
            n = 1
            for size in where.local_shape(tuple(p.shape)):
                n *= size
            layer, part = _kind(name)
            if part in ("attention", "mlp"):
                want += n + 4  # fp8 values + an fp32 scale per projection
            elif part == "experts":
                want += n + 4 * config.num_experts * (2 if name.endswith("w13") else 1)
            else:
                want += 2 * n  # bf16
        assert rank_weight_bytes(rank_shard(config, layout, rank, 24), 1, 2, 4) == want
