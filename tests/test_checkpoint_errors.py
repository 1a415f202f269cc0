"""Broken checkpoints and configs give a clear ``SkymoeError`` that names the culprit.

Each test breaks one thing in a valid tiny checkpoint and checks the exception type and that
the message names the file and/or the tensor or key. Also: the CLI reports such errors on one
stderr line without a traceback, and loading does not hold two copies of the weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import skymoe
from skymoe import CheckpointError, ConfigError, SkymoeError, SkyworkMoeConfig
from skymoe import build_model, load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
VICTIM = "model.layers.1.block_sparse_moe.experts.2.w3.weight"


def _config(**overrides) -> SkyworkMoeConfig:
    kwargs = dict(model_type="skywork_moe", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                  torch_dtype="float32", initializer_range=0.1)
    kwargs.update(overrides)
    return SkyworkMoeConfig(**kwargs)


@pytest.fixture()
def ckpt(tmp_path) -> Path:
    """A valid single-file checkpoint; the test breaks it."""
    model = build_model(_config(), dtype=torch.float32, seed=0)
    return save_model(model, tmp_path / "ckpt")


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skymoe", *map(str, args)], capture_output=True,
                          text=True, env=_env(), timeout=120)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line on stderr, got:\n{proc.stderr}"
    assert "error" in lines[0].lower()
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


# ----------------------------------------------------------------------------------- sanity
def test_valid_checkpoint_loads(ckpt):
    model = load_model(ckpt, dtype=torch.float32)
    expected = load_file(str(ckpt / "model.safetensors"))
    w13 = model.model.layers[1].block_sparse_moe.experts.w13
    ffn = w13.shape[1] // 2
    torch.testing.assert_close(w13[2, ffn:], expected[VICTIM], rtol=0, atol=0)
    torch.testing.assert_close(w13[2, :ffn], expected[VICTIM.replace("w3", "w1")], rtol=0, atol=0)
    torch.testing.assert_close(model.model.layers[1].block_sparse_moe.experts.w2[2],
                               expected[VICTIM.replace("w3", "w2")], rtol=0, atol=0)


def test_error_hierarchy():
    assert issubclass(CheckpointError, SkymoeError) and issubclass(ConfigError, SkymoeError)


# --------------------------------------------------------------------------------- tensors
def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop(VICTIM))
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt, dtype=torch.float32)
    assert VICTIM in str(exc.value)
    assert str(ckpt) in str(exc.value)


def test_missing_norm_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        load_model(ckpt, dtype=torch.float32)


def test_wrong_shape_names_tensor_and_both_shapes(ckpt):
    name = "model.layers.0.self_attn.k_proj.weight"  # [16, 32] (2 kv heads x 8)

    def edit(t):
        assert list(t[name].shape) == [16, 32]
        t[name] = torch.zeros(32, 32)

    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt, dtype=torch.float32)
    msg = str(exc.value)
    assert name in msg and "model.safetensors" in msg
    assert "[32, 32]" in msg and "[16, 32]" in msg


def test_wrong_shape_of_expert_slice(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__(VICTIM, torch.zeros(47, 32)))
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt, dtype=torch.float32)
    msg = str(exc.value)
    assert VICTIM in msg and "[47, 32]" in msg and "[48, 32]" in msg


def test_wrong_dtype_names_tensor_and_dtype(ckpt):
    name = "model.embed_tokens.weight"
    _rewrite(ckpt, lambda t: t.__setitem__(name, torch.ones(t[name].shape, dtype=torch.int64)))
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt, dtype=torch.float32)
    msg = str(exc.value)
    assert name in msg and "int64" in msg


def test_unexpected_extra_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.extra_proj.weight",
                                          torch.zeros(4, 4)))
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt, dtype=torch.float32)
    assert "model.layers.0.self_attn.extra_proj.weight" in str(exc.value)
    assert "model.safetensors" in str(exc.value)


def test_expert_index_out_of_range_is_named(ckpt):
    name = "model.layers.0.block_sparse_moe.experts.4.w1.weight"  # only experts 0..3 exist
    _rewrite(ckpt, lambda t: t.__setitem__(name, torch.zeros(48, 32)))
    with pytest.raises(CheckpointError, match=r"experts\.4\.w1\.weight"):
        load_model(ckpt, dtype=torch.float32)


def test_extra_layer_is_named(ckpt):
    name = "model.layers.2.input_layernorm.weight"  # the config has 2 layers
    _rewrite(ckpt, lambda t: t.__setitem__(name, torch.ones(32)))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.input_layernorm\.weight"):
        load_model(ckpt, dtype=torch.float32)


def test_rotary_inv_freq_is_ignored(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq",
                                          torch.ones(4)))
    load_model(ckpt, dtype=torch.float32)


# ----------------------------------------------------------------------------------- files
def test_truncated_safetensors_names_the_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt, dtype=torch.float32)
    assert str(f) in str(exc.value)


def test_garbage_safetensors_header_names_the_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt, dtype=torch.float32)
    assert str(f) in str(exc.value)


def test_invalid_config_json_names_config(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "mixtral", "hidden_size": 32,,}')
    with pytest.raises(ConfigError) as exc:
        load_model(ckpt, dtype=torch.float32)
    assert "config.json" in str(exc.value)


def test_missing_config_json_names_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        load_model(ckpt, dtype=torch.float32)


def test_no_weights_names_directory(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as exc:
        load_model(ckpt, dtype=torch.float32)
    assert str(ckpt) in str(exc.value)


def test_index_pointing_to_missing_shard_names_it(tmp_path):
    model = build_model(_config(), dtype=torch.float32, seed=0)
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    (out / shards[1]).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_model(out, dtype=torch.float32)
    assert shards[1] in str(exc.value)


def test_index_with_renamed_shard_names_it(tmp_path):
    model = build_model(_config(), dtype=torch.float32, seed=0)
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=20_000)
    path = out / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "model-99999-of-99999.safetensors"
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-99999-of-99999.safetensors"):
        load_model(out, dtype=torch.float32)


def test_invalid_index_json_names_index(tmp_path):
    model = build_model(_config(), dtype=torch.float32, seed=0)
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=20_000)
    (out / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_model(out, dtype=torch.float32)


class _NotATensor:
    pass


def test_bin_with_arbitrary_pickle_is_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    torch.save({"model.norm.weight": _NotATensor()}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused") as err:
        load_model(ckpt, dtype=torch.float32)
    message = str(err.value)
    # One line, naming the refused object, and never the unsafe weights_only=False advice.
    assert "\n" not in message and "_NotATensor" in message and "weights_only" not in message


def test_truncated_bin_names_the_file(ckpt):
    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    data = (ckpt / "pytorch_model.bin").read_bytes()
    (ckpt / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(ckpt, dtype=torch.float32)


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize("key,value", [
    ("num_key_value_heads", 3),
    ("num_experts_per_tok", 5),
    ("hidden_act", "gelu"),
    ("rms_norm_eps", 0),
    ("vocab_size", 0),
    ("torch_dtype", "float64"),
])
def test_invalid_config_value_names_key(key, value):
    with pytest.raises(ConfigError) as exc:
        _config(**{key: value})
    assert f"'{key}'" in str(exc.value)


@pytest.mark.parametrize("key,value", [
    ("num_key_value_heads", 3),
    ("num_experts_per_tok", 5),
    ("hidden_act", "gelu"),
    ("num_hidden_layers", "two"),
])
def test_invalid_config_value_in_checkpoint_names_key_and_file(ckpt, key, value):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as exc:
        load_model(ckpt, dtype=torch.float32)
    msg = str(exc.value)
    assert f"'{key}'" in msg and "config.json" in msg


def test_unsupported_model_type_is_named(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="gpt2"):
        load_model(ckpt, dtype=torch.float32)


def test_config_that_does_not_match_weights(ckpt):
    # Weights of a 2-layer model, config says 3 layers: the missing layer's tensors are named.
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\."):
        load_model(ckpt, dtype=torch.float32)


def test_mixtral_flavor_of_skywork_features_is_refused(tmp_path):
    model = build_model(_config(moe_use_logits_norm=True), dtype=torch.float32, seed=0)
    with pytest.raises(ConfigError, match="mixtral"):
        save_model(model, tmp_path / "bad", model_type="mixtral")
    assert not (tmp_path / "bad" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------- CLI
def test_cli_info_on_broken_checkpoint(ckpt):
    (ckpt / "config.json").write_text("{broken")
    proc = _cli("info", ckpt)
    _assert_one_line_error(proc, "config.json")
    assert proc.returncode == 2


def test_cli_info_on_missing_path(tmp_path):
    proc = _cli("info", tmp_path / "does-not-exist")
    _assert_one_line_error(proc, "does-not-exist")


def test_cli_generate_on_broken_weights(ckpt):
    skymoe.checkpoint.save_byte_tokenizer(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vocab_size"] = 259  # matches the tokenizer; the weights are for 64: shape error
    (ckpt / "config.json").write_text(json.dumps(cfg))
    proc = _cli("generate", ckpt, "--prompt", "hi", "--max-new-tokens", "2")
    _assert_one_line_error(proc, "model.safetensors", "[64, 32]", "[259, 32]")
    assert proc.returncode == 2


def test_cli_generate_on_missing_tokenizer(ckpt):
    proc = _cli("generate", ckpt, "--prompt", "hi", "--max-new-tokens", "2")
    _assert_one_line_error(proc, "tokenizer")


def test_cli_generate_bad_argument(ckpt):
    skymoe.checkpoint.save_byte_tokenizer(ckpt)
    proc = _cli("generate", ckpt, "--prompt", "hi", "--max-new-tokens", "2",
                "--temperature", "-1")
    _assert_one_line_error(proc, "temperature")


# ------------------------------------------------------------------------------ peak memory
_MEASURE = textwrap.dedent("""
    import resource, sys
    import torch, skymoe
    from skymoe.checkpoint import load_model
    torch.set_num_threads(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(before * 1024, after * 1024, nbytes)
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_peak_memory_is_below_two_copies(tmp_path, dtype):
    # ~40 MB of fp32 weights, mostly experts: 2 layers x 8 experts x 3 x 64 x 3328.
    cfg = _config(vocab_size=128, hidden_size=64, intermediate_size=3328, num_experts=8,
                  num_attention_heads=4, num_key_value_heads=4)
    model = build_model(cfg, dtype=torch.float32, seed=0)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 38e6 < model_bytes < 45e6
    out = save_model(model, tmp_path / "big", max_shard_bytes=8 * 1024**2)
    del model
    shards = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) >= 5
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(out), dtype], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, after, nbytes = map(int, proc.stdout.split())
    # Loading a fp32 checkpoint as bf16 must not allocate the model in fp32 first.
    model_bytes //= 2 if dtype == "bfloat16" else 1
    assert nbytes == model_bytes
    growth = after - before
    assert growth < 1.6 * model_bytes, (
        f"peak RSS grew by {growth / 1e6:.1f} MB loading a {model_bytes / 1e6:.1f} MB model "
        f"({growth / model_bytes:.2f}x)")
