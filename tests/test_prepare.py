"""Kernel choice and inference preparation: a plain model computes with PyTorch ops and never
builds C++, ``use_kernels`` reaches every module that computes with kernels, and ``prepare``
refuses what cannot work (with what, where and what to do) before changing anything."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import skymoe
from skymoe.config import SkyworkMoeConfig
from skymoe.errors import ConfigError
from skymoe.infer.cpu_kernels import can_pack
from skymoe.infer.prepare import prepare
from skymoe.kernels import PYTORCH_KERNELS, Kernels, load_native
from skymoe.model.loss import CausalLMLoss, causal_lm_loss

CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_experts=4,
              moe_expert_interval=1, initializer_range=0.1)


def _model(dtype: torch.dtype = torch.float32) -> skymoe.SkyworkForCausalLM:
    return skymoe.build_model(SkyworkMoeConfig(**CONFIG), dtype=dtype, seed=0)


def test_a_plain_model_never_builds_the_native_kernels(tmp_path):
    """Training and inference forwards of a model nobody prepared, in a fresh process with an
    empty kernel cache: no build starts, nothing is written to the cache."""
    script = textwrap.dedent("""
        import torch, skymoe
        from skymoe.config import SkyworkMoeConfig
        from skymoe.infer import generate
        model = skymoe.build_model(SkyworkMoeConfig(**%r), seed=0)
        ids = torch.randint(0, 97, (2, 9))
        model(ids, labels=ids).loss.backward()
        generate(model.eval(), ids, 3)
    """ % CONFIG)
    env = dict(os.environ, SKYMOE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "native CPU kernels" not in done.stderr
    assert not (tmp_path / "cache").exists()


def test_a_new_model_computes_with_pytorch_ops_until_told_otherwise():
    model = _model()
    experts = [block.experts for block in model.moe_blocks()]
    assert all(e.kernels is PYTORCH_KERNELS for e in experts)
    assert model.loss_function is causal_lm_loss
    chosen = Kernels(native=None)
    assert model.use_kernels(chosen) is model
    assert all(e.kernels is chosen for e in experts)
    assert isinstance(model.loss_function, CausalLMLoss) and model.loss_function.kernels is chosen


def test_use_kernels_keeps_a_replaced_loss():
    """Tensor parallelism's vocabulary-parallel loss has no native kernel: it stays."""
    model = _model()

    def custom(logits, labels):
        return logits.sum()

    model.loss_function = custom
    model.use_kernels(PYTORCH_KERNELS)
    assert model.loss_function is custom


def test_kernels_survive_a_deep_copy():
    import copy

    native = load_native()
    if native is None:
        pytest.skip("native kernels cannot be built here")
    model = _model().use_kernels(Kernels(native))
    twin = copy.deepcopy(model)
    assert twin.moe_blocks()[0].experts.kernels.native is native


def test_cpu_modules_false_sets_the_kernels_and_keeps_the_modules():
    model = _model()
    before = [type(m) for m in model.modules()]
    chosen = Kernels(native=None)
    assert prepare(model, kernels=chosen, cpu_modules=False) is model
    assert [type(m) for m in model.modules()] == before
    assert model.moe_blocks()[0].experts.kernels is chosen


@pytest.mark.parametrize("attach", ["hook", "dispatcher"])
def test_cpu_modules_for_a_parallelized_model_are_refused(attach):
    """What tensor and expert parallelism attach (forward hooks, ``experts.parallel``) would
    be bypassed by CPU inference modules; kernels alone are fine."""
    model = _model()
    if attach == "hook":  # what parallelize's column/row-parallel attention registers
        model.model.layers[1].self_attn.register_forward_pre_hook(lambda _, args: args)
        where = r"model\.layers\.1\.self_attn: has forward hooks"
    else:
        model.moe_blocks()[0].experts.parallel = lambda *args: None
        where = r"model\.layers\.0\.block_sparse_moe\.experts: has an expert-parallel dispatcher"
    before = [type(m) for m in model.modules()]
    with pytest.raises(ConfigError, match=where + r".*cpu_modules=False"):
        prepare(model, kernels=PYTORCH_KERNELS, cpu_modules="auto")
    assert [type(m) for m in model.modules()] == before
    prepare(model, kernels=PYTORCH_KERNELS, cpu_modules=False)


def test_required_cpu_modules_where_none_apply_are_refused():
    with pytest.raises(ConfigError, match=r"cpu_modules=True\): the model is in torch\.float16"):
        prepare(_model(torch.float16), kernels=PYTORCH_KERNELS, cpu_modules=True)
    with pytest.raises(ConfigError, match="cpu_modules must be True, False or 'auto'"):
        prepare(_model(), kernels=PYTORCH_KERNELS, cpu_modules="yes")
    fp16 = _model(torch.float16)
    assert prepare(fp16, kernels=PYTORCH_KERNELS) is fp16  # "auto": nothing applies, no error


def test_packed_preparation_twice_is_refused():
    model = _model()
    if not can_pack(model):
        pytest.skip("oneDNN packing unavailable on this CPU")
    prepare(model, kernels=PYTORCH_KERNELS)
    with pytest.raises(ConfigError, match=r"already a Packed(Linear|Experts)"):
        prepare(model, kernels=PYTORCH_KERNELS)


def test_an_fp8_model_prepares_like_the_cli_does(tmp_path):
    """An FP8 checkpoint's model keeps its FP8 modules (they compute with the chosen kernels);
    the rest gets the native modules; decode logits match the unprepared model."""
    from skymoe.checkpoint import load_model, save_model
    from skymoe.model.fp8 import Fp8Experts, Fp8Linear
    from skymoe.quantize import quantize_checkpoint

    native = load_native()
    if native is None:
        pytest.skip("native kernels cannot be built here")
    save_model(_model(), tmp_path / "bf16")
    out = quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", show_progress=False)
    plain, prepared = load_model(out), prepare(load_model(out), kernels=Kernels(native))
    experts = prepared.moe_blocks()[0].experts
    assert isinstance(experts, Fp8Experts) and experts.kernels.native is native
    assert isinstance(prepared.model.layers[0].self_attn.q_proj, Fp8Linear)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        caches = plain.new_kv_cache(2, 9), prepared.new_kv_cache(2, 9)
        for step in (ids, ids[:, :1]):
            torch.testing.assert_close(prepared(step, cache=caches[1]).logits,
                                       plain(step, cache=caches[0]).logits,
                                       rtol=1e-4, atol=1e-4)
