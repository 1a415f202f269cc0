"""SkyworkMoeConfig: the three HF flavours, validation, parameter accounting."""

import json
from pathlib import Path

import pytest
import torch

import skymoe
from skymoe.config import SkyworkMoeConfig, parameter_counts

PRESETS = Path(skymoe.__file__).parent / "configs"


def test_real_skywork_config_parameter_counts_match_the_report():
    c = SkyworkMoeConfig.from_json_file(PRESETS / "skywork-moe-base.json")
    assert (c.num_experts, c.num_experts_per_tok, c.head_size) == (16, 2, 128)
    assert c.moe_use_logits_norm and not c.moe_2layer_gate and c.moe_feature_no_mul_topk
    counts = parameter_counts(c)
    # Skywork-MoE's published size: 146.4B total, 0.60B embeddings + head, 22.1B active
    # without embeddings.
    assert counts["total"] / 1e9 == pytest.approx(146.4, abs=0.05)
    assert counts["embedding"] / 1e9 == pytest.approx(0.60, abs=0.01)
    assert counts["active_non_embedding"] / 1e9 == pytest.approx(22.1, abs=0.05)


def test_counts_agree_with_the_built_module():
    c = SkyworkMoeConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         moe_expert_interval=2, moe_2layer_gate=True)
    model = skymoe.SkyworkForCausalLM(c)
    assert parameter_counts(c)["total"] == sum(p.numel() for p in model.parameters())


def test_expert_interval_places_moe_on_every_nth_layer():
    c = SkyworkMoeConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                         num_attention_heads=4, num_experts=4, moe_expert_interval=2)
    model = skymoe.SkyworkForCausalLM(c)
    kinds = ["moe" if hasattr(layer, "block_sparse_moe") else "dense"
             for layer in model.model.layers]
    assert kinds == ["dense", "moe", "dense", "moe"]
    assert hasattr(model.model.layers[0], "mlp")


def test_mixtral_reads_as_skywork_with_normalization_off():
    raw = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 100,
           "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
           "num_experts_per_tok": 2, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
           "dtype": "float32", "router_aux_loss_coef": 0.02, "sliding_window": None}
    c = SkyworkMoeConfig.from_hf_dict(raw)
    assert (c.num_experts, c.moe_use_logits_norm, c.rope_theta, c.dtype) == (8, False, 1e6,
                                                                              torch.float32)
    out = c.to_hf_dict()
    assert out["num_local_experts"] == 8 and "num_experts" not in out
    assert out["router_aux_loss_coef"] == 0.02 and "sliding_window" in out
    assert "moe_use_logits_norm" not in out


def test_llama_reads_as_dense():
    c = SkyworkMoeConfig.from_hf_dict({"model_type": "llama", "hidden_size": 32,
                                       "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "vocab_size": 50})
    assert not c.is_moe and not c.is_moe_layer(0)
    assert c.to_hf_dict()["architectures"] == ["LlamaForCausalLM"]


def test_skywork_round_trip_keeps_list_experts_and_unknown_keys(tmp_path):
    raw = json.loads((PRESETS / "skywork-moe-base.json").read_text())
    raw["my_custom_key"] = {"nested": [1, 2]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = SkyworkMoeConfig.from_json_file(tmp_path)
    c.save(tmp_path / "out")
    back = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in raw.items():
        assert back[key] == value, key
    assert back["num_experts"] == [16]


@pytest.mark.parametrize("override,key", [
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"num_experts_per_tok": 17}, "num_experts_per_tok"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_experts": [16, 8]}, "num_experts"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"moe_expert_interval": 0}, "moe_expert_interval"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"moe_use_skywork_gating": True}, "moe_use_skywork_gating"),
])
def test_invalid_configs_name_the_key(tmp_path, override, key):
    raw = json.loads((PRESETS / "skywork-moe-base.json").read_text())
    raw.update(override)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(skymoe.ConfigError, match=key) as info:
        SkyworkMoeConfig.from_json_file(tmp_path)
    assert "config.json" in str(info.value)


def test_mixtral_flavour_refuses_skywork_only_options():
    c = SkyworkMoeConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=4, num_experts=4, moe_use_logits_norm=True)
    with pytest.raises(skymoe.ConfigError, match="mixtral"):
        c.to_hf_dict("mixtral")


def test_skywork_config_without_2layer_key_uses_the_class_default():
    raw = json.loads((PRESETS / "skywork-moe-base.json").read_text())
    del raw["moe_2layer_gate"]
    assert SkyworkMoeConfig.from_hf_dict(raw).moe_2layer_gate is True
    raw["moe_2layer_gate"] = False
    assert SkyworkMoeConfig.from_hf_dict(raw).moe_2layer_gate is False


def test_head_dim_and_sliding_window_checks_are_independent():
    # An explicit head_dim allows hidden % heads != 0; a sliding window does not skip that check.
    SkyworkMoeConfig(hidden_size=30, head_dim=8, num_attention_heads=4, num_experts=4)
    with pytest.raises(skymoe.ConfigError, match="hidden_size"):
        SkyworkMoeConfig(hidden_size=30, num_attention_heads=4, num_experts=4, sliding_window=16)
