"""Numerical parity with Hugging Face transformers (the golden reference) in both directions.

HF checkpoints (Mixtral MoE, Llama dense; single file, sharded safetensors, .bin shards) load
into skymoe with the same logits as transformers' own model; checkpoints written by skymoe load
back into transformers with the same logits. Models are tiny and fp32.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import skymoe  # noqa: E402
from skymoe import SkyworkMoeConfig, build_model, load_model, save_model  # noqa: E402

VOCAB = 96
ATOL = 1e-4
SKYWORK_BASE_JSON = Path(skymoe.__file__).parent / "configs" / "skywork-moe-base.json"


# ----------------------------------------------------------------------------------- helpers
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights: N(0, 0.15) matrices and norm weights around 1 (not all ones), so
    logits are O(1) and a swapped / missing / mis-sliced tensor changes them visibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def _mixtral_config(**overrides) -> "transformers.MixtralConfig":
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=128, tie_word_embeddings=False,
                  router_jitter_noise=0.0)
    kwargs.update(overrides)
    return transformers.MixtralConfig(**kwargs)


def _llama_config(**overrides) -> "transformers.LlamaConfig":
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  rope_theta=10000.0, max_position_embeddings=128, attention_bias=False,
                  mlp_bias=False, tie_word_embeddings=False)
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def _hf_model(cls, config, seed: int):
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    _randomize(model, seed)
    return model.eval()


def _ids(seed: int = 0, shape=(2, 17)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    # Guard against a vacuous comparison (near-zero logits would match anything).
    assert expected.std() > 0.1, "reference logits are degenerate; the test would prove nothing"
    diff = (actual - expected).abs().max().item()
    assert diff < ATOL, f"max abs logit difference {diff:.3g} >= {ATOL}"


def _save_bin_shards(src_safetensors: list[Path], dst: Path, parts: int,
                     config_src: Path) -> None:
    """Rewrite an HF checkpoint as pytorch_model-0000i-of-0000n.bin shards + index."""
    state: dict[str, torch.Tensor] = {}
    for f in src_safetensors:
        state.update(load_file(str(f)))
    names = sorted(state)
    dst.mkdir()
    weight_map = {}
    chunk = -(-len(names) // parts)
    for i in range(parts):
        fname = f"pytorch_model-{i + 1:05d}-of-{parts:05d}.bin"
        part = {n: state[n].clone() for n in names[i * chunk:(i + 1) * chunk]}
        torch.save(part, dst / fname)
        weight_map.update({n: fname for n in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())},
         "weight_map": weight_map}))
    (dst / "config.json").write_text((config_src / "config.json").read_text())


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_mixtral(tmp_path_factory):
    model = _hf_model(transformers.MixtralForCausalLM, _mixtral_config(), seed=0)
    path = tmp_path_factory.mktemp("hf_mixtral")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    model = _hf_model(transformers.LlamaForCausalLM, _llama_config(), seed=1)
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path)
    return model, path


# ------------------------------------------------------------------------ HF -> skymoe, MoE
@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_mixtral_hf_to_skymoe_logits_match(hf_mixtral, impl):
    hf, path = hf_mixtral
    assert (path / "model.safetensors").is_file()
    model = load_model(path, dtype=torch.float32, expert_impl=impl)
    assert model.config.model_type == "mixtral"
    assert model.config.num_experts == 4 and model.config.num_experts_per_tok == 2
    assert model.config.moe_use_logits_norm is False
    assert model.config.num_key_value_heads == 2
    assert not model.training
    assert all(b.experts.impl == impl for b in model.moe_blocks()) and len(model.moe_blocks()) == 2
    ids = _ids()
    _assert_close(_logits(model, ids), _logits(hf, ids))


def test_mixtral_single_sequence_and_last_only(hf_mixtral):
    hf, path = hf_mixtral
    model = load_model(path, dtype=torch.float32)
    ids = _ids(seed=5, shape=(1, 9))
    expected = _logits(hf, ids)
    _assert_close(_logits(model, ids), expected)
    with torch.no_grad():
        last = model(ids, last_only=True).logits
    assert last.shape == (1, 1, VOCAB)
    assert (last[:, 0] - expected[:, -1]).abs().max() < ATOL


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_mixtral_sharded_safetensors(tmp_path, hf_mixtral, impl):
    hf, _ = hf_mixtral
    path = tmp_path / "sharded"
    hf.save_pretrained(path, max_shard_size="50KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (path / "model.safetensors").exists()
    model = load_model(path, dtype=torch.float32, expert_impl=impl)
    ids = _ids(seed=1)
    _assert_close(_logits(model, ids), _logits(hf, ids))


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_mixtral_bin_shards_with_index(tmp_path, hf_mixtral, impl):
    hf, src = hf_mixtral
    dst = tmp_path / "bin"
    _save_bin_shards([src / "model.safetensors"], dst, parts=3, config_src=src)
    assert not list(dst.glob("*.safetensors"))
    model = load_model(dst, dtype=torch.float32, expert_impl=impl)
    ids = _ids(seed=2)
    _assert_close(_logits(model, ids), _logits(hf, ids))


def test_mixtral_single_bin_file(tmp_path, hf_mixtral):
    hf, src = hf_mixtral
    dst = tmp_path / "bin1"
    dst.mkdir()
    torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
    (dst / "config.json").write_text((src / "config.json").read_text())
    model = load_model(dst, dtype=torch.float32)
    ids = _ids(seed=3)
    _assert_close(_logits(model, ids), _logits(hf, ids))


def test_bin_shards_without_index(tmp_path, hf_mixtral):
    hf, src = hf_mixtral
    dst = tmp_path / "bin_noindex"
    _save_bin_shards([src / "model.safetensors"], dst, parts=2, config_src=src)
    (dst / "pytorch_model.bin.index.json").unlink()
    model = load_model(dst, dtype=torch.float32)
    ids = _ids(seed=4)
    _assert_close(_logits(model, ids), _logits(hf, ids))


# ------------------------------------------------------------------------ skymoe -> HF, MoE
def test_skymoe_save_loads_into_hf_mixtral(tmp_path, hf_mixtral):
    hf, path = hf_mixtral
    model = load_model(path, dtype=torch.float32)
    out = save_model(model, tmp_path / "resaved")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral"
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["num_local_experts"] == 4 and "num_experts" not in cfg
    back, info = transformers.MixtralForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    back.eval()
    ids = _ids(seed=6)
    _assert_close(_logits(back, ids), _logits(hf, ids))
    _assert_close(_logits(back, ids), _logits(model, ids))


def _native_moe_config(**overrides) -> SkyworkMoeConfig:
    kwargs = dict(model_type="skywork_moe", vocab_size=VOCAB, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  moe_use_logits_norm=False, max_position_embeddings=128,
                  initializer_range=0.15, torch_dtype="float32")
    kwargs.update(overrides)
    return SkyworkMoeConfig(**kwargs)


def test_native_skymoe_model_saved_as_mixtral_loads_into_hf(tmp_path):
    model = build_model(_native_moe_config(), dtype=torch.float32, seed=0)
    _randomize(model, seed=7)  # norms != 1 so a norm/name mix-up shows
    out = save_model(model, tmp_path / "native", model_type="mixtral")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    hf, info = transformers.MixtralForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    ids = _ids(seed=8)
    _assert_close(_logits(model, ids), _logits(hf, ids))


def test_save_model_small_shards_round_trip(tmp_path, hf_mixtral):
    hf, path = hf_mixtral
    model = load_model(path, dtype=torch.float32)
    out = save_model(model, tmp_path / "small", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    assert not list(out.glob(".shard-*")) and not list(out.glob("*.tmp"))
    ids = _ids(seed=9)
    back = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _assert_close(_logits(back, ids), _logits(hf, ids))
    again = load_model(out, dtype=torch.float32)
    _assert_close(_logits(again, ids), _logits(hf, ids))
    # Re-saving into the same directory as one file removes the stale shards and index.
    save_model(again, out)
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("model-*.safetensors"))
    _assert_close(_logits(load_model(out, dtype=torch.float32), ids), _logits(hf, ids))


# ----------------------------------------------------------------------------- dense (Llama)
def test_llama_hf_to_skymoe_logits_match(hf_llama):
    hf, path = hf_llama
    model = load_model(path, dtype=torch.float32)
    assert model.config.model_type == "llama" and model.config.num_experts == 0
    assert model.moe_blocks() == []
    ids = _ids(seed=10)
    _assert_close(_logits(model, ids), _logits(hf, ids))


def test_skymoe_llama_save_loads_into_hf(tmp_path, hf_llama):
    hf, path = hf_llama
    model = load_model(path, dtype=torch.float32)
    out = save_model(model, tmp_path / "llama_out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    back, info = transformers.LlamaForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    back.eval()
    ids = _ids(seed=11)
    _assert_close(_logits(back, ids), _logits(hf, ids))


def test_llama_tied_embeddings_load(tmp_path):
    hf = _hf_model(transformers.LlamaForCausalLM, _llama_config(tie_word_embeddings=True), seed=2)
    hf.save_pretrained(tmp_path / "tied")
    model = load_model(tmp_path / "tied", dtype=torch.float32)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = _ids(seed=12)
    _assert_close(_logits(model, ids), _logits(hf, ids))


def test_llama_tied_embeddings_save_loads_into_hf(tmp_path):
    cfg = SkyworkMoeConfig(model_type="llama", num_experts=0, vocab_size=VOCAB, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=True,
                           max_position_embeddings=128, torch_dtype="float32")
    model = build_model(cfg, dtype=torch.float32, seed=0)
    _randomize(model, seed=13)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = save_model(model, tmp_path / "tied_out")
    hf, info = transformers.LlamaForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    ids = _ids(seed=14)
    _assert_close(_logits(model, ids), _logits(hf, ids))


# ------------------------------------------------------------------- Skywork config round trip
def test_skywork_config_round_trip_keeps_every_key(tmp_path):
    raw = json.loads(SKYWORK_BASE_JSON.read_text())
    cfg = SkyworkMoeConfig.from_json_file(SKYWORK_BASE_JSON)
    assert cfg.model_type == "skywork_moe"
    assert cfg.num_experts == 16 and cfg.hidden_size == 4608 and cfg.num_hidden_layers == 52
    out = cfg.to_hf_dict()
    assert out["num_experts"] == [16] and isinstance(out["num_experts"], list)
    moe_keys = [k for k in raw if k.startswith("moe_")]
    assert len(moe_keys) == 6
    for key in moe_keys:
        assert key in out and out[key] == raw[key], key
    # Every key of the original file survives with its value (nothing is dropped).
    for key, value in raw.items():
        assert key in out, f"key {key!r} lost in the round trip"
        assert out[key] == value, f"key {key!r}: {out[key]!r} != {value!r}"


def test_skywork_config_unknown_key_survives_file_round_trip(tmp_path):
    raw = json.loads(SKYWORK_BASE_JSON.read_text())
    raw["my_custom_key"] = 123
    raw["nested_custom"] = {"a": [1, 2], "b": None}
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(raw))
    cfg = SkyworkMoeConfig.from_json_file(src)
    assert cfg.extra["my_custom_key"] == 123
    dst = tmp_path / "dst"
    cfg.save(dst)
    written = json.loads((dst / "config.json").read_text())
    assert written["my_custom_key"] == 123
    assert written["nested_custom"] == {"a": [1, 2], "b": None}
    assert written["num_experts"] == [16]
    again = SkyworkMoeConfig.from_json_file(dst)
    assert again == cfg


def test_transformers_v5_mixtral_config_fields_are_read(hf_mixtral):
    # transformers v5 writes rope_parameters / dtype instead of rope_theta / torch_dtype.
    _, path = hf_mixtral
    raw = json.loads((path / "config.json").read_text())
    cfg = SkyworkMoeConfig.from_json_file(path)
    assert cfg.rope_theta == 10000.0
    assert cfg.rms_norm_eps == raw["rms_norm_eps"]
    assert cfg.num_key_value_heads == raw["num_key_value_heads"]
    assert cfg.torch_dtype == "float32"


def test_mixtral_rope_theta_is_used(tmp_path):
    # A non-default rope_theta read from the HF config must reach the rotary embedding.
    hf = _hf_model(transformers.MixtralForCausalLM, _mixtral_config(rope_theta=500.0), seed=3)
    hf.save_pretrained(tmp_path / "theta")
    model = load_model(tmp_path / "theta", dtype=torch.float32)
    assert model.config.rope_theta == 500.0
    ids = _ids(seed=15)
    _assert_close(_logits(model, ids), _logits(hf, ids))
    # ... and the theta skymoe writes is the one transformers reads back.
    out = save_model(model, tmp_path / "theta_out")
    back = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _assert_close(_logits(back, ids), _logits(hf, ids))


def test_mixtral_sliding_window_is_honoured_or_refused(tmp_path):
    # A Mixtral/Mistral-style config with a sliding window shorter than the sequence: skymoe
    # must either compute the same logits or refuse the config; silently wrong logits are a bug.
    hf = _hf_model(transformers.MixtralForCausalLM, _mixtral_config(sliding_window=8), seed=5)
    hf.save_pretrained(tmp_path / "sw")
    try:
        model = load_model(tmp_path / "sw", dtype=torch.float32)
    except skymoe.ConfigError as exc:
        assert "sliding_window" in str(exc)
        return
    ids = _ids(seed=21)
    _assert_close(_logits(model, ids), _logits(hf, ids))


@pytest.mark.parametrize("overrides", [
    dict(num_key_value_heads=1),                 # multi-query attention
    dict(head_dim=32),                           # head_dim != hidden / heads
    dict(num_local_experts=3, num_experts_per_tok=1, tie_word_embeddings=False),
])
def test_mixtral_variants_match(tmp_path, overrides):
    hf = _hf_model(transformers.MixtralForCausalLM, _mixtral_config(**overrides), seed=4)
    hf.save_pretrained(tmp_path / "variant")
    model = load_model(tmp_path / "variant", dtype=torch.float32)
    ids = _ids(seed=16)
    _assert_close(_logits(model, ids), _logits(hf, ids))
    out = save_model(model, tmp_path / "variant_out")
    back = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _assert_close(_logits(back, ids), _logits(hf, ids))


def test_loss_matches_hf_llama(hf_llama):
    hf, path = hf_llama
    model = load_model(path, dtype=torch.float32)
    ids = _ids(seed=17)
    labels = ids.clone()
    labels[0, 5:9] = -100
    with torch.no_grad():
        expected = hf(ids, labels=labels).loss
        actual = model(ids, labels=labels).loss
    assert abs(actual.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("features", [
    dict(moe_use_logits_norm=True, moe_gate_norm_std=0.7),
    dict(moe_2layer_gate=True),
    dict(moe_expert_interval=2, num_hidden_layers=3),
    dict(moe_feature_no_mul_topk=False),
    dict(tie_word_embeddings=True),
])
def test_skywork_checkpoint_round_trip_is_exact(tmp_path, features):
    """Skywork-only features have no HF reference: save -> load must be bit-exact."""
    model = build_model(_native_moe_config(**features), dtype=torch.float32, seed=0)
    _randomize(model, seed=18)
    out = save_model(model, tmp_path / "sky", max_shard_bytes=100_000)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "skywork_moe" and cfg["num_experts"] == [4]
    for key, value in features.items():
        assert cfg[key] == value
    back = load_model(out, dtype=torch.float32)
    assert dataclasses.replace(back.config, extra={}) == dataclasses.replace(model.config, extra={})
    expected = dict(model.named_parameters(remove_duplicate=False))
    for name, p in back.named_parameters(remove_duplicate=False):
        assert torch.equal(p, expected[name]), name
    ids = _ids(seed=19)
    assert torch.equal(_logits(back, ids), _logits(model, ids))


def test_bfloat16_save_and_default_dtype(tmp_path, hf_mixtral):
    hf, path = hf_mixtral
    model = load_model(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    out = save_model(model, tmp_path / "bf16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    again = load_model(out)  # dtype from config.json
    assert again.dtype == torch.bfloat16
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # bf16 logits stay near the fp32 HF reference (HF's own bf16 model is ~0.4 off here;
    # logits have std ~1.1 and max ~4, so a wrong weight would be far outside this bound).
    ids = _ids(seed=20)
    diff = (_logits(again, ids) - _logits(hf, ids)).abs().max().item()
    assert diff < 0.6
