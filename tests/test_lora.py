"""LoRA on attention, dense MLPs and experts: a fresh adapter is the identity, the adapted
model equals a model whose weights were merged by hand, only adapters (and the router when
asked) receive gradients."""

import copy

import pytest
import torch

from skymoe.config import SkyworkMoeConfig
from skymoe.model.moe import SwiGLUExperts, experts_loop
from skymoe.model.lora import LoRAConfig, add_lora, lora_parameters, merge_lora
from skymoe.model.transformer import build_model

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "experts")


def tiny_config(**overrides) -> SkyworkMoeConfig:
    # Every second layer MoE: dense MLP targets are exercised too.
    fields = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                  num_experts_per_tok=2, moe_expert_interval=2, torch_dtype="float32")
    fields.update(overrides)
    return SkyworkMoeConfig(**fields)


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def hand_merged(base: torch.nn.Module, adapted: torch.nn.Module, scale: float) -> torch.nn.Module:
    """``base`` with every adapted weight replaced by ``W + scale * B @ A``, computed here in
    float64 from the adapter tensors (independent of ``merge_lora``)."""
    merged = copy.deepcopy(base)
    params = dict(merged.named_parameters())
    lora = lora_parameters(adapted)
    with torch.no_grad():
        for name in lora:
            owner, _, leaf = name.rpartition(".lora.")
            if leaf == "A":
                W = params[f"{owner}.weight"]
                B, A = lora[f"{owner}.lora.B"].double(), lora[name].double()
                W.copy_(W.double() + scale * B @ A)
            elif leaf in ("w13_A", "w2_A"):
                which = leaf[:-2]
                W = params[f"{owner}.{which}"]
                B, A = lora[f"{owner}.lora.{which}_B"].double(), lora[name].double()
                for e in range(W.shape[0]):
                    W[e].copy_(W[e].double() + scale * B[e] @ A[e])
    return merged


@pytest.fixture
def pair():
    torch.manual_seed(0)
    base = build_model(tiny_config(), seed=3)
    adapted = copy.deepcopy(base)
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=ALL_TARGETS)
    names = add_lora(adapted, cfg, seed=5)
    return base, adapted, cfg, names


def test_targets_adapted_and_fresh_adapter_is_identity(pair):
    base, adapted, _, names = pair
    assert "model.layers.0.self_attn.q_proj" in names
    assert "model.layers.0.mlp.down_proj" in names
    assert "model.layers.1.block_sparse_moe.experts" in names
    ids = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(adapted(ids).logits, base(ids).logits, rtol=0, atol=0)
    # Base parameters keep their names (checkpoints still map one to one).
    base_names = {n for n, _ in base.named_parameters()}
    assert base_names <= {n for n, _ in adapted.named_parameters()}


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_adapted_equals_hand_merged_weights(pair, impl):
    base, adapted, cfg, _ = pair
    randomize_adapters(adapted)
    adapted.set_expert_impl(impl)
    ids = torch.randint(0, 97, (3, 13))
    want = hand_merged(base, adapted, cfg.scale)(ids).logits
    got = adapted(ids).logits
    assert (got - base(ids).logits).abs().max() > 1e-3  # the adapters do change the model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merge_lora_folds_and_removes_adapters(pair):
    base, adapted, cfg, names = pair
    randomize_adapters(adapted)
    ids = torch.randint(0, 97, (2, 9))
    want = adapted(ids).logits
    assert sorted(merge_lora(adapted)) == sorted(names)
    assert not lora_parameters(adapted)
    assert {n for n, _ in adapted.named_parameters()} == {n for n, _ in base.named_parameters()}
    torch.testing.assert_close(adapted(ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train_router", [False, True])
def test_only_adapters_receive_gradients(train_router):
    model = build_model(tiny_config(), seed=3)
    add_lora(model, LoRAConfig(rank=2, targets=ALL_TARGETS, train_router=train_router))
    ids = torch.randint(0, 97, (2, 10))
    model(ids, labels=ids).loss.backward()
    adapters = lora_parameters(model)
    for name, p in model.named_parameters():
        is_router = ".block_sparse_moe.gate." in name
        if name in adapters:
            # B starts at zero, so only B's gradient is non-zero on the first step.
            assert p.requires_grad and p.grad is not None, name
        elif is_router and train_router:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert all(adapters[n].grad.abs().sum() > 0 for n in adapters if n.endswith("B"))


def test_bf16_grouped_experts_with_adapters_match_fp32_reference():
    # bf16 rows take the grouped-GEMM kernel (>= 16 rows per expert): the low-rank products
    # run grouped like the base ones. Reference: the fp32 loop over experts on weights merged
    # here by hand.
    torch.manual_seed(0)
    holder = torch.nn.ModuleDict({"experts": SwiGLUExperts(4, 64, 64)})
    experts = holder["experts"]
    torch.nn.init.normal_(experts.w13, std=0.1)
    torch.nn.init.normal_(experts.w2, std=0.1)
    add_lora(holder, LoRAConfig(rank=8, alpha=16.0, targets=("experts",)), seed=2)
    randomize_adapters(holder)
    lora = experts.lora
    x = torch.randn(128, 64)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(128)])
    weights = torch.softmax(torch.randn(128, 2), -1)
    w13 = experts.w13.double() + 2.0 * torch.bmm(lora.w13_B.double(), lora.w13_A.double())
    w2 = experts.w2.double() + 2.0 * torch.bmm(lora.w2_B.double(), lora.w2_A.double())
    want = experts_loop(x.double(), w13, w2, ids, weights.double())
    with torch.no_grad():
        got = holder.to(torch.bfloat16)["experts"](x.bfloat16(), ids, weights)
    torch.testing.assert_close(got.double(), want, rtol=0.03, atol=0.03 * float(want.detach().abs().max()))


def test_seeded_adapters_are_reproducible_and_per_module():
    a, b = (build_model(tiny_config(), seed=3) for _ in range(2))
    add_lora(a, LoRAConfig(rank=2), seed=7)
    add_lora(b, LoRAConfig(rank=2), seed=7)
    pa, pb = lora_parameters(a), lora_parameters(b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    q0, q1 = (pa[f"model.layers.{i}.self_attn.q_proj.lora.A"] for i in (0, 1))
    assert not torch.equal(q0, q1)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="targets"):
        LoRAConfig(targets=("qproj",))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    model = build_model(tiny_config(), seed=3)
    add_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already"):
        add_lora(model, LoRAConfig(rank=2))
