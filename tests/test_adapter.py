"""LoRA adapters as files: skymoe's round trip, refusal of another base's adapter, and PEFT
interop both ways (transformers' Mixtral + PEFT give the same logits as skymoe with the same
adapter)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from skymoe import SkyworkMoeConfig, build_model, save_model
from skymoe.checkpoint.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter,
                                       read_adapter_config, save_adapter, trainable_tensors)
from skymoe.errors import CheckpointError
from skymoe.model.lora import LoRAConfig, add_lora, lora_parameters

from test_hf_parity import VOCAB, _native_moe_config
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "experts")


def moe_config(**overrides) -> SkyworkMoeConfig:
    return _native_moe_config(**{"model_type": "mixtral", **overrides})


def randomize(params, seed: int, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(x).logits.float()


@pytest.fixture
def adapted():
    base = build_model(moe_config(), seed=0)
    model = copy.deepcopy(base)
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS, train_router=True)
    add_lora(model, cfg, seed=1)
    randomize(lora_parameters(model).values(), seed=2)
    randomize([p for n, p in model.named_parameters() if ".gate." in n], seed=3)
    return base, model, cfg


def test_round_trip_restores_the_same_model(tmp_path, adapted):
    base, model, cfg = adapted
    save_adapter(trainable_tensors(model), tmp_path / "a", cfg, "mixtral", base="tiny")
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
    assert config["modules_to_save"] == ["gate"]
    assert read_adapter_config(tmp_path / "a") == cfg
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path / "a", "mixtral") == cfg
    x = ids()
    torch.testing.assert_close(logits(fresh, x), logits(model, x), rtol=0, atol=0)


def test_expert_factors_use_peft_layout(tmp_path, adapted):
    # PEFT's ParamWrapper: lora_A [r*E, in] expert-major, lora_B [out, r*E] with column k*E + e.
    _, model, cfg = adapted
    save_adapter(trainable_tensors(model), tmp_path / "a", cfg, "mixtral")
    stored = load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    lora = model.model.layers[0].block_sparse_moe.experts.lora
    prefix = "base_model.model.model.layers.0.mlp.experts"
    A, B = stored[f"{prefix}.base_layer.lora_A.weight"], stored[f"{prefix}.base_layer.lora_B.weight"]
    assert A.shape == (4 * 4, 64) and B.shape == (2 * 96, 4 * 4)
    e, k = 2, 3
    torch.testing.assert_close(A[e * 4 + k], lora.w13_A[e, k].detach())
    torch.testing.assert_close(B[:, k * 4 + e], lora.w13_B[e, :, k].detach())
    assert stored[f"{prefix}.lora_A.weight"].shape == (16, 96)  # down_proj: in = F
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in stored
    assert "base_model.model.model.layers.1.mlp.gate.weight" in stored


def test_adapter_for_another_base_is_refused_by_name(tmp_path, adapted):
    base, model, cfg = adapted
    save_adapter(trainable_tensors(model), tmp_path / "a", cfg, "mixtral")
    wider = build_model(moe_config(hidden_size=32), seed=0)
    before = {n for n, _ in wider.named_parameters()}
    with pytest.raises(CheckpointError, match=r"tensor base_model\.model\..*is \[.*this model"):
        load_adapter(wider, tmp_path / "a", "mixtral")
    assert {n for n, _ in wider.named_parameters()} == before  # left as it was
    assert all(p.requires_grad for p in wider.parameters())
    deeper = build_model(moe_config(num_hidden_layers=1), seed=0)
    with pytest.raises(CheckpointError, match=r"layers\.1\..* has no place"):
        load_adapter(deeper, tmp_path / "a", "mixtral")
    with pytest.raises(CheckpointError, match="adapter for a mixtral base"):
        load_adapter(copy.deepcopy(base), tmp_path / "a", "skywork_moe")


def test_unsupported_peft_settings_are_refused(tmp_path, adapted):
    _, model, cfg = adapted
    save_adapter(trainable_tensors(model), tmp_path / "a", cfg, "mixtral")
    config_file = tmp_path / "a" / ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        read_adapter_config(tmp_path / "a")
    config_file.write_text(json.dumps({**config, "target_modules": "all-linear"}))
    with pytest.raises(CheckpointError, match="pattern"):
        read_adapter_config(tmp_path / "a")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        read_adapter_config(tmp_path)


# --------------------------------------------------------------------------- PEFT interop
def _hf_base(tmp_path, base):
    transformers = pytest.importorskip("transformers")
    out = save_model(base, tmp_path / "base", model_type="mixtral")
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def test_skymoe_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers", minversion="5")  # Mixtral's fused experts
    base = build_model(moe_config(), seed=0)
    model = copy.deepcopy(base)
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=TARGETS)
    add_lora(model, cfg, seed=1)
    randomize(lora_parameters(model).values(), seed=2)
    save_adapter(trainable_tensors(model), tmp_path / "a", cfg, "mixtral")
    hf = _hf_base(tmp_path, base)
    x = ids(3)
    assert (logits(model, x) - logits(hf, x)).abs().max() > 1e-2  # the adapter matters
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    torch.testing.assert_close(logits(with_adapter, x), logits(model, x), rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_in_skymoe_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers", minversion="5")  # Mixtral's fused experts
    base = build_model(moe_config(), seed=0)
    hf = _hf_base(tmp_path, base)
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    peft_model = peft.get_peft_model(hf, peft_cfg)
    randomize([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=4)
    peft_model.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    cfg = load_adapter(model, tmp_path / "peft", "mixtral")
    assert cfg.targets == ("q_proj", "v_proj", "experts") and cfg.rank == 4
    x = ids(5)
    torch.testing.assert_close(logits(model, x), logits(peft_model.eval(), x),
                               rtol=1e-5, atol=1e-5)
