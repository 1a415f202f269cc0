"""Upcycling a dense Llama-format checkpoint into a Skywork-MoE checkpoint (``skymoe.upcycle``).

The reference is always independent of the code under test: the dense model as transformers'
``LlamaForCausalLM`` computes it, the dense weights as transformers wrote them, and hand
computation (parameter counts, the advice ratio). Models are tiny and fp32, except the
streaming test, which needs an output several times larger than its memory bound.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from skymoe import SkymoeError, SkyworkMoeConfig, build_model, load_model, save_model  # noqa: E402
from skymoe.checkpoint.io import tensor_infos  # noqa: E402
from skymoe.checkpoint.tokenizer import save_byte_tokenizer  # noqa: E402
from skymoe.cli import main as cli_main  # noqa: E402
from skymoe.upcycle import UpcycleOptions, upcycle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, FFN, LAYERS = 128, 32, 64, 2
ATOL = 1e-5
FFN_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


# ----------------------------------------------------------------------------------- helpers
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _hf_dense(seed: int, **overrides) -> "transformers.LlamaForCausalLM":
    kwargs = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                  num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
                  attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).to(torch.float32)
    # Non-trivial weights: N(0, 0.15) matrices, norm weights around 1 (not all ones), so the
    # logits are O(1) and a swapped / missing / altered tensor changes them visibly.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _ids(seed: int = 0, shape=(2, 13)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``directory`` (read with safetensors itself)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _config_json(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _no_leftovers(out: Path) -> None:
    """Neither the output nor a hidden work directory next to it."""
    assert not out.exists(), f"{out} was created by a failed upcycle"
    siblings = sorted(p.name for p in out.parent.glob(f".{out.name}.*"))
    assert not siblings, f"hidden work directories left behind: {siblings}"


def _copy_dense(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _expert(w: dict[str, torch.Tensor], layer: int, e: int, which: str) -> torch.Tensor:
    return w[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{which}.weight"]


def _dense_ffn(w: dict[str, torch.Tensor], layer: int, which: str) -> torch.Tensor:
    return w[f"model.layers.{layer}.mlp.{FFN_NAMES[which]}.weight"]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """(transformers model, its save_pretrained directory, its weights as written)."""
    model = _hf_dense(seed=1)
    path = tmp_path_factory.mktemp("dense")
    model.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return model, path, load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def dense_tied(tmp_path_factory):
    model = _hf_dense(seed=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("dense_tied")
    model.save_pretrained(path)
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    return model, path


@pytest.fixture(scope="module")
def noisy(dense, tmp_path_factory):
    """Upcycles with noise: {(noise_std, seed, copy): directory}."""
    _, path, _ = dense
    root = tmp_path_factory.mktemp("noisy")
    runs = {}
    for s, seed, copy in ((0.01, 0, 0), (0.05, 0, 0), (0.01, 0, 1), (0.01, 1, 0)):
        out = root / f"s{s}-seed{seed}-{copy}"
        upcycle(path, out, UpcycleOptions(num_experts=4, top_k=2, noise_std=s, seed=seed),
                show_progress=False)
        runs[(s, seed, copy)] = out
    return runs


# ------------------------------------------------------------------- 1. function preservation
@pytest.mark.parametrize("top_k,norm,router", [
    (1, True, "random"), (1, False, "random"), (2, True, "random"), (2, False, "random"),
    (4, True, "random"), (4, False, "random"), (2, True, "zeros"), (1, False, "zeros"),
])
def test_upcycled_model_computes_the_dense_function(dense, tmp_path, top_k, norm, router):
    hf, path, dense_w = dense
    out = tmp_path / "moe"
    ret = upcycle(path, out, UpcycleOptions(num_experts=4, top_k=top_k, use_logits_norm=norm,
                                            router_init=router), show_progress=False)
    assert Path(ret) == out

    cfg = _config_json(out)
    dense_cfg = _config_json(path)
    assert cfg["model_type"] == "skywork_moe"
    assert cfg["num_experts"] == [4]
    assert cfg["num_experts_per_tok"] == top_k
    assert cfg["moe_use_logits_norm"] is norm
    assert cfg["moe_feature_no_mul_topk"] is True
    assert cfg["moe_expert_interval"] == 1
    # Absent, a Skywork config means a 2-layer gate; the upcycle writes a 1-layer router.
    assert cfg["moe_2layer_gate"] is False
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert cfg[key] == dense_cfg[key], key

    w = _weights(out)
    # Attention, norms, embeddings, LM head: bit-identical copies of the dense tensors.
    for name, t in dense_w.items():
        if ".mlp." not in name:
            assert torch.equal(w[name], t), name
    # Experts: exact copies of the dense FFN (no noise asked for); no dense MLP left.
    for layer in range(LAYERS):
        assert not any(n.startswith(f"model.layers.{layer}.mlp.") for n in w)
        for e in range(4):
            for which in ("w1", "w3", "w2"):
                assert torch.equal(_expert(w, layer, e, which), _dense_ffn(dense_w, layer, which))
        gate = w[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert gate.shape == (4, HIDDEN) and gate.dtype == torch.float32
        if router == "zeros":
            assert torch.count_nonzero(gate) == 0
        else:  # UpcycleOptions.router_std defaults to 0.02
            assert 0.02 * 0.7 < gate.std().item() < 0.02 * 1.3
    expected_names = set(dense_w) - {n for n in dense_w if ".mlp." in n}
    expected_names |= {f"model.layers.{i}.block_sparse_moe.experts.{e}.{x}.weight"
                       for i in range(LAYERS) for e in range(4) for x in ("w1", "w2", "w3")}
    expected_names |= {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(LAYERS)}
    assert set(w) == expected_names

    model = load_model(out, dtype=torch.float32)
    assert len(model.moe_blocks()) == LAYERS
    ids = _ids()
    ref = _logits(hf, ids)
    assert ref.std() > 0.1, "reference logits are degenerate; the test would prove nothing"
    diff = (_logits(model, ids) - ref).abs().max().item()
    assert diff < ATOL, f"max abs logit difference {diff:.3g} >= {ATOL}"


def test_upcycle_of_tied_embedding_model(dense_tied, tmp_path):
    hf, path = dense_tied
    out = upcycle(path, tmp_path / "moe", UpcycleOptions(num_experts=4, top_k=2),
                  show_progress=False)
    assert _config_json(out)["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _weights(out)
    ids = _ids(1)
    diff = (_logits(load_model(out, dtype=torch.float32), ids) - _logits(hf, ids)).abs().max()
    assert diff.item() < ATOL


# ---------------------------------------------------------------------------- 2. interval
def test_interval_makes_every_second_layer_moe(dense, tmp_path):
    hf, path, dense_w = dense
    out = upcycle(path, tmp_path / "moe", UpcycleOptions(num_experts=4, top_k=2, interval=2),
                  show_progress=False)
    names = set(tensor_infos(out))
    # Layer 0: (0 + 1) % 2 != 0 -> stays dense.
    for p in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.0.mlp.{p}.weight" in names
    assert not any(n.startswith("model.layers.0.block_sparse_moe") for n in names)
    # Layer 1: (1 + 1) % 2 == 0 -> MoE.
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.1.block_sparse_moe.gate.weight" in names
    assert "model.layers.1.block_sparse_moe.experts.4.w2.weight" not in names
    assert not any(n.startswith("model.layers.1.mlp.") for n in names)
    assert _config_json(out)["moe_expert_interval"] == 2
    w = _weights(out)
    assert torch.equal(w["model.layers.0.mlp.up_proj.weight"],
                       dense_w["model.layers.0.mlp.up_proj.weight"])

    model = load_model(out, dtype=torch.float32)
    assert len(model.moe_blocks()) == 1
    ids = _ids(2)
    diff = (_logits(model, ids) - _logits(hf, ids)).abs().max().item()
    assert diff < ATOL


# ------------------------------------------------------------------------------- 3. noise
@pytest.mark.parametrize("s", [0.01, 0.05])
def test_noise_has_the_requested_relative_std(dense, noisy, s):
    _, _, dense_w = dense
    w = _weights(noisy[(s, 0, 0)])
    for name, t in dense_w.items():
        if ".mlp." not in name:
            assert torch.equal(w[name], t), f"noise reached non-FFN tensor {name}"
    for layer in range(LAYERS):
        for which in ("w1", "w3", "w2"):
            ref = _dense_ffn(dense_w, layer, which)
            copies = [_expert(w, layer, e, which) for e in range(4)]
            for e, c in enumerate(copies):
                delta = c - ref
                assert (delta != 0).float().mean() > 0.99, (layer, e, which)
                rel = (delta.std() / ref.std()).item()
                assert abs(rel / s - 1) < 0.15, f"layer {layer} expert {e} {which}: {rel:.4g}"
            for a in range(4):
                for b in range(a + 1, 4):
                    assert not torch.equal(copies[a], copies[b]), \
                        f"experts {a} and {b} of layer {layer} got the same noise ({which})"
        # Noise is drawn independently for w1 and w3 (different tensors, same shape).
        d1 = _expert(w, layer, 0, "w1") - _dense_ffn(dense_w, layer, "w1")
        d3 = _expert(w, layer, 0, "w3") - _dense_ffn(dense_w, layer, "w3")
        assert not torch.allclose(d1 / d1.std(), d3 / d3.std())


def test_noise_is_seeded(noisy):
    a, a2, b = (_weights(noisy[k]) for k in ((0.01, 0, 0), (0.01, 0, 1), (0.01, 1, 0)))
    assert set(a) == set(a2) == set(b)
    for name in a:
        assert torch.equal(a[name], a2[name]), f"same seed, different {name}"
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert any(".experts." in n for n in changed) and any(".gate." in n for n in changed)
    assert all(".block_sparse_moe." in n for n in changed)


def test_noise_moves_the_function_and_more_noise_moves_it_more(dense, noisy):
    hf, _, _ = dense
    ids = _ids(3)
    ref = _logits(hf, ids)
    d_small = (_logits(load_model(noisy[(0.01, 0, 0)], dtype=torch.float32), ids) - ref)
    d_large = (_logits(load_model(noisy[(0.05, 0, 0)], dtype=torch.float32), ids) - ref)
    small, large = d_small.abs().max().item(), d_large.abs().max().item()
    assert small > ATOL
    assert large > small


# ----------------------------------------------------------------------- 4. Drop-Upcycling
@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_drop_upcycling_reinitializes_the_same_units_in_w1_w3_w2(dense, tmp_path, fraction):
    _, path, dense_w = dense
    out = upcycle(path, tmp_path / "moe",
                  UpcycleOptions(num_experts=4, top_k=2, reinit_fraction=fraction),
                  show_progress=False)
    w = _weights(out)
    count = round(fraction * FFN)  # 32 for 0.5, 19 for 0.3
    for layer in range(LAYERS):
        per_expert = []
        for e in range(4):
            w1, g = _expert(w, layer, e, "w1"), _dense_ffn(dense_w, layer, "w1")
            w3, u = _expert(w, layer, e, "w3"), _dense_ffn(dense_w, layer, "w3")
            w2, d = _expert(w, layer, e, "w2"), _dense_ffn(dense_w, layer, "w2")
            rows1 = set((w1 != g).any(dim=1).nonzero().flatten().tolist())
            rows3 = set((w3 != u).any(dim=1).nonzero().flatten().tolist())
            cols2 = set((w2 != d).any(dim=0).nonzero().flatten().tolist())
            assert len(rows1) == count, (layer, e, len(rows1))
            assert rows1 == rows3 == cols2, f"layer {layer} expert {e}: units differ per matrix"
            keep = sorted(set(range(FFN)) - rows1)
            assert torch.equal(w1[keep], g[keep]) and torch.equal(w3[keep], u[keep])
            assert torch.equal(w2[:, keep], d[:, keep])
            # Re-drawn units are whole new rows (every value changed), with the statistics of
            # the dense weight (Drop-Upcycling: N(mean(W), std(W))).
            units = sorted(rows1)
            for new, old, ref in ((w1[units], g[units], g), (w3[units], u[units], u),
                                  (w2[:, units], d[:, units], d)):
                assert (new != old).float().mean() > 0.99
                assert abs(new.std().item() / ref.std().item() - 1) < 0.15
                assert abs(new.mean().item() - ref.mean().item()) < 0.2 * ref.std().item()
            per_expert.append(frozenset(rows1))
        assert len(set(per_expert)) == 4, f"layer {layer}: experts share re-initialized units"


# ---------------------------------------------------------------------- 5. streaming memory
_STREAM_SCRIPT = textwrap.dedent("""
    import gc, json, os, sys
    import torch
    torch.set_num_threads(1)
    from skymoe import SkyworkMoeConfig
    from skymoe.model.transformer import SkyworkForCausalLM
    from skymoe.upcycle import UpcycleOptions, upcycle

    # The first model built on the meta device imports ~800 torch modules (~70 MB, whatever
    # the model size): do that before the baseline, so the growth measures the data only.
    with torch.device("meta"):
        SkyworkForCausalLM(SkyworkMoeConfig(
            model_type="llama", num_experts=0, vocab_size=64, hidden_size=32,
            intermediate_size=48, num_hidden_layers=1, num_attention_heads=4))

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak_rss():
        # VmHWM: this process's peak RSS. Not getrusage's ru_maxrss, which on Linux also keeps
        # the high-water mark of the mm before exec, i.e. of the forked pytest process.
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    gc.collect()
    base = rss()
    upcycle(sys.argv[1], sys.argv[2],
            UpcycleOptions(num_experts=16, top_k=2, max_shard_bytes=int(sys.argv[3])),
            show_progress=False)
    peak = peak_rss()
    print(json.dumps({"base": base, "peak": peak, "growth": peak - base}))
""")


def test_upcycle_streams_with_bounded_memory(tmp_path):
    mb = 2**20
    config = SkyworkMoeConfig.from_hf_dict({
        "model_type": "llama", "vocab_size": 1024, "hidden_size": 512,
        "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 8, "max_position_embeddings": 128, "torch_dtype": "float32"})
    dense_dir = tmp_path / "dense"
    model = build_model(config, dtype=torch.float32, seed=0)
    save_model(model, dense_dir, max_shard_bytes=8 * mb)
    gate_ref = model.model.layers[2].mlp.gate_proj.weight.detach().clone()
    del model
    assert len(list(dense_dir.glob("model-*.safetensors"))) >= 5

    out = tmp_path / "moe"
    shard = 16 * mb
    proc = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, str(dense_dir), str(out),
                           str(shard)], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    mem = json.loads(proc.stdout.strip().splitlines()[-1])

    bound = 4 * shard + 64 * mb
    files = sorted(out.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    # 4 layers x 16 experts x 3 x 512 x 2048 x 4 bytes ~ 805 MB: an implementation holding
    # the output (or a layer's experts) in memory cannot stay under the bound.
    assert total > 5 * bound, (total, bound)
    assert mem["growth"] < bound, f"RSS grew by {mem['growth'] / mb:.0f} MiB (bound " \
                                  f"{bound / mb:.0f} MiB) while writing {total / mb:.0f} MiB"
    assert len(files) >= 40
    for f in files:  # each shard respects max_shard_bytes (no single tensor exceeds it here)
        assert f.stat().st_size <= shard + 64 * 1024, f.name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}

    moe = load_model(out, dtype=torch.float32)
    assert moe.config.num_experts == 16 and len(moe.moe_blocks()) == 4
    w13 = moe.model.layers[2].block_sparse_moe.experts.w13
    assert torch.equal(w13[11, :2048], gate_ref)
    del moe, w13
    shutil.rmtree(out)  # ~800 MB: do not keep it in pytest's retained tmp dirs


# ------------------------------------------------------------------------------ 6. bad input
def test_directory_without_config(dense, tmp_path):
    _, path, _ = dense
    src = tmp_path / "noconfig"
    src.mkdir()
    shutil.copy(path / "model.safetensors", src / "model.safetensors")
    out = tmp_path / "moe"
    with pytest.raises(SkymoeError, match=r"noconfig.*config\.json"):
        upcycle(src, out, UpcycleOptions(num_experts=4), show_progress=False)
    _no_leftovers(out)


def test_moe_checkpoint_is_refused(dense, tmp_path):
    _, path, _ = dense
    moe = upcycle(path, tmp_path / "moe", UpcycleOptions(num_experts=4), show_progress=False)
    out = tmp_path / "moe2"
    with pytest.raises(SkymoeError, match=r"moe.*(MoE|expert)"):
        upcycle(moe, out, UpcycleOptions(num_experts=4), show_progress=False)
    _no_leftovers(out)


def test_wrong_shape_is_named_and_nothing_is_left(dense, tmp_path):
    _, path, _ = dense
    src = _copy_dense(path, tmp_path / "badshape")
    cfg = _config_json(src)
    cfg["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "moe"
    # Tiny shards: some are already written when the mis-shaped FFN tensor comes in.
    with pytest.raises(SkymoeError) as info:
        upcycle(src, out, UpcycleOptions(num_experts=4, max_shard_bytes=1), show_progress=False)
    msg = str(info.value)
    assert "model.safetensors" in msg
    assert re.search(r"model\.layers\.\d\.mlp\.(gate|up|down)_proj\.weight", msg), msg
    assert "64" in msg and "96" in msg, msg
    _no_leftovers(out)


def test_missing_tensor_is_named(dense, tmp_path):
    _, path, dense_w = dense
    src = tmp_path / "missing"
    src.mkdir()
    victim = "model.layers.1.self_attn.o_proj.weight"
    save_file({k: v for k, v in dense_w.items() if k != victim}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(path / "config.json", src / "config.json")
    out = tmp_path / "moe"
    with pytest.raises(SkymoeError, match=re.escape(victim)):
        upcycle(src, out, UpcycleOptions(num_experts=4, max_shard_bytes=1), show_progress=False)
    _no_leftovers(out)


def test_unknown_tensor_is_named(dense, tmp_path):
    _, path, dense_w = dense
    src = tmp_path / "extra"
    src.mkdir()
    stray = "model.layers.7.mlp.gate_proj.weight"
    save_file({**dense_w, stray: torch.zeros(FFN, HIDDEN)}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(path / "config.json", src / "config.json")
    out = tmp_path / "moe"
    with pytest.raises(SkymoeError, match=re.escape(stray)) as info:
        upcycle(src, out, UpcycleOptions(num_experts=4, max_shard_bytes=1), show_progress=False)
    assert "model.safetensors" in str(info.value)
    _no_leftovers(out)


def test_truncated_weights_file(dense, tmp_path):
    _, path, _ = dense
    src = _copy_dense(path, tmp_path / "truncated")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "moe"
    with pytest.raises(SkymoeError, match=r"model\.safetensors"):
        upcycle(src, out, UpcycleOptions(num_experts=4), show_progress=False)
    _no_leftovers(out)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_existing_output_needs_overwrite(dense, tmp_path):
    _, path, dense_w = dense
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = _snapshot(out)
    with pytest.raises(SkymoeError, match=r"moe.*(exists|overwrite)"):
        upcycle(path, out, UpcycleOptions(num_experts=4), show_progress=False)
    assert _snapshot(out) == before
    assert not list(tmp_path.glob(".moe.*"))

    # A failing upcycle with overwrite=True leaves the existing directory as it was.
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(path / "config.json", bad / "config.json")
    save_file({k: v for k, v in dense_w.items() if "layers.1.mlp.up" not in k},
              str(bad / "model.safetensors"))
    with pytest.raises(SkymoeError):
        upcycle(bad, out, UpcycleOptions(num_experts=4, max_shard_bytes=1), overwrite=True,
                show_progress=False)
    assert _snapshot(out) == before
    assert not list(tmp_path.glob(".moe.*"))

    upcycle(path, out, UpcycleOptions(num_experts=4), overwrite=True, show_progress=False)
    assert not (out / "keep.txt").exists()
    assert _config_json(out)["num_experts"] == [4]
    assert load_model(out, dtype=torch.float32).config.num_experts == 4
    assert not list(tmp_path.glob(".moe.*")), "work or backup directory left behind"


# ------------------------------------------------------------------------------------- 7. CLI
def _hf_param_counts(hf) -> tuple[int, int]:
    """(total, active) of the top-2, 4-expert upcycle, from the dense model's own tensors."""
    dense_total = sum(p.numel() for p in hf.parameters())
    ffn = sum(p.numel() for n, p in hf.named_parameters() if "layers.0.mlp." in n)
    router = 4 * HIDDEN
    total = dense_total + LAYERS * (3 * ffn + router)   # 3 extra expert copies per layer
    active = dense_total + LAYERS * (1 * ffn + router)  # 1 extra expert per token
    return total, active


def test_cli_upcycle(dense, tmp_path):
    hf, path, _ = dense
    out = tmp_path / "moe"
    proc = subprocess.run([sys.executable, "-m", "skymoe", "upcycle", str(path), str(out),
                           "--experts", "4", "--top-k", "2"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    total, active = _hf_param_counts(hf)
    assert (total, active) == (63904, 39328)  # hand count: see _hf_param_counts
    assert f"{total / 1e3:.2f}K parameters" in proc.stdout, proc.stdout
    assert f"{active / 1e3:.2f}K active" in proc.stdout, proc.stdout
    cfg = _config_json(out)
    assert cfg["num_experts"] == [4] and cfg["num_experts_per_tok"] == 2

    missing = tmp_path / "no-such-dense"
    out2 = tmp_path / "moe2"
    proc = subprocess.run([sys.executable, "-m", "skymoe", "upcycle", str(missing), str(out2),
                           "--experts", "4"], capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("skymoe upcycle: error:"), proc.stderr
    assert str(missing) in lines[0]
    _no_leftovers(out2)


def test_cli_options_reach_the_checkpoint(dense, tmp_path, capsys):
    _, path, _ = dense
    out = tmp_path / "moe"
    code = cli_main(["upcycle", str(path), str(out), "--experts", "3", "--top-k", "3",
                     "--interval", "2", "--no-logits-norm", "--router-init", "zeros",
                     "--gate-norm-std", "2.5", "--max-shard-size", "20KB"])
    assert code == 0
    cfg = _config_json(out)
    assert cfg["num_experts"] == [3] and cfg["num_experts_per_tok"] == 3
    assert cfg["moe_expert_interval"] == 2 and cfg["moe_use_logits_norm"] is False
    assert cfg["moe_gate_norm_std"] == 2.5
    w = _weights(out)
    assert torch.count_nonzero(w["model.layers.1.block_sparse_moe.gate.weight"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").is_file()

    capsys.readouterr()
    assert cli_main(["upcycle", str(path), str(tmp_path / "x"), "--experts", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--experts" in err
    _no_leftovers(tmp_path / "x")


def _advice(capsys, *args: str) -> tuple[float, str]:
    capsys.readouterr()
    assert cli_main(["upcycle", "--advise", *args]) == 0
    text = capsys.readouterr().out
    m = re.search(r"C_moe / C_dense = ([0-9.eE+-]+)", text)
    assert m, text
    return float(m[1]), text


def test_cli_advise(capsys, dense):
    # C_dense = 6 * 1e6 * 1e9; C_moe = 6 * (1e6 * (1 + 2/3)) * 3e9 -> ratio 5.0
    ratio, text = _advice(capsys, "--dense-tokens", "1e9", "--moe-tokens", "3e9",
                          "--dense-params", "1e6")
    assert ratio == pytest.approx(6 * (1e6 * (1 + 2 / 3)) * 3e9 / (6 * 1e6 * 1e9), rel=5e-3)
    assert ratio == pytest.approx(5.0, rel=5e-3)
    assert "6e+15" in text  # C_dense
    assert "train from scratch" in text and "advice: upcycle" not in text

    ratio, text = _advice(capsys, "--dense-tokens", "1e9", "--moe-tokens", "1e8",
                          "--dense-params", "1e6")
    assert ratio == pytest.approx((1 + 2 / 3) * 0.1, rel=5e-3)
    assert "advice: upcycle" in text and "train from scratch" not in text

    ratio, text = _advice(capsys, "--dense-tokens", "1e9", "--moe-tokens", "9e8",
                          "--dense-params", "1e6")
    assert ratio == pytest.approx(1.5, rel=5e-3) and "borderline" in text

    # From a checkpoint: dense non-embedding params from the HF model; the MoE adds one
    # expert (top-2) and a 16-expert router per layer (--experts default 16).
    hf, path, _ = dense
    dense_ne = sum(p.numel() for n, p in hf.named_parameters()
                   if "embed_tokens" not in n and "lm_head" not in n)
    ffn = sum(p.numel() for n, p in hf.named_parameters() if "layers.0.mlp." in n)
    moe_ne = dense_ne + LAYERS * (ffn + 16 * HIDDEN)
    ratio, text = _advice(capsys, str(path), "--dense-tokens", "1e9", "--moe-tokens", "1e9")
    assert ratio == pytest.approx(moe_ne / dense_ne, rel=5e-3)
    assert f"{dense_ne:.4g} params" in text


# ---------------------------------------------------------------------------- 8. tokenizer
def test_tokenizer_files_are_copied(dense, tmp_path):
    _, path, _ = dense
    src = _copy_dense(path, tmp_path / "with_tok")
    save_byte_tokenizer(src)
    out = upcycle(src, tmp_path / "moe", UpcycleOptions(num_experts=4), show_progress=False)
    copied = [n for n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
              if (src / n).is_file()]
    assert "tokenizer.json" in copied and "tokenizer_config.json" in copied
    for name in copied:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    import skymoe

    tok = skymoe.load_tokenizer(out)
    assert tok.decode(tok.encode("héllo", add_bos=False)) == "héllo"


# ------------------------------------------------------------------ input validation (CLI)
def test_cli_advise_rejects_zero_dense_tokens(capsys):
    code = cli_main(["upcycle", "--advise", "--dense-tokens", "0", "--moe-tokens", "1e9",
                     "--dense-params", "1e6"])
    assert code == 2
    assert "dense tokens must be a positive number" in capsys.readouterr().err


def test_cli_rejects_malformed_shard_size(dense, tmp_path, capsys):
    _, path, _ = dense
    code = cli_main(["upcycle", str(path), str(tmp_path / "moe"), "--max-shard-size", "1.2.3"])
    assert code == 2
    assert "1.2.3" in capsys.readouterr().err and not (tmp_path / "moe").exists()


def test_inert_llama_sliding_window_key_does_not_change_the_function(dense, tmp_path):
    hf, path, _ = dense
    src = _copy_dense(path, tmp_path / "sw")
    cfg = _config_json(src)
    cfg["sliding_window"] = 4  # Llama has no sliding window: transformers ignores the key
    (src / "config.json").write_text(json.dumps(cfg))
    ids = _ids(4)
    ref = _logits(hf, ids)
    assert (_logits(load_model(src, dtype=torch.float32), ids) - ref).abs().max() < ATOL
    out = upcycle(src, tmp_path / "moe", UpcycleOptions(num_experts=4, top_k=2),
                  show_progress=False)
    diff = (_logits(load_model(out, dtype=torch.float32), ids) - ref).abs().max().item()
    assert diff < ATOL, f"upcycled logits differ from the dense model's by {diff:.3g}"
