"""MoE block math against hand computations and a naive per-token reference."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from skymoe.model.moe import (MoEBlock, experts_grouped, experts_loop, gating_logit_norm,
                              route)

VECTORS = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.5, 2.0, 0.0], [3.0, 3.0, 3.0, 7.0]]


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_gating_logit_norm_matches_hand_computation(scale):
    got = gating_logit_norm(torch.tensor(VECTORS, dtype=torch.float64), scale)
    for row, vec in zip(got.tolist(), VECTORS):
        mean, std = statistics.fmean(vec), statistics.stdev(vec)  # stdev divides by n - 1
        assert row == pytest.approx([scale * (v - mean) / std for v in vec], abs=1e-12)
    # A worked value: [1, 2, 3, 4] has unbiased std sqrt(5/3); its first entry is -1.5 / 1.29099.
    assert got[0, 0].item() == pytest.approx(scale * -1.5 / math.sqrt(5 / 3), abs=1e-12)


def test_gating_logit_norm_guards_constant_logits():
    out = gating_logit_norm(torch.full((2, 8), 0.3), 1.0)
    assert torch.isfinite(out).all()
    # Rounding noise may shift all logits alike; the routing stays uniform.
    torch.testing.assert_close(torch.softmax(out, -1), torch.full((2, 8), 1 / 8))


def test_route_renormalizes_topk():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(5.0), math.log(2.0) - 9]])
    r = route(logits, top_k=2)
    # softmax ~ [1, 2, 5, ~0] / 8; top-2 = experts 2 and 1 with 5/7 and 2/7 after renormalizing.
    assert r.expert_ids_TK.tolist() == [[2, 1]]
    assert r.weights_TK[0].tolist() == pytest.approx([5 / 7, 2 / 7], abs=1e-6)
    assert r.probs_TE.dtype == torch.float32


def naive_moe(block: MoEBlock, x_TH: torch.Tensor) -> torch.Tensor:
    """Per-token reference written from the formulas of docs/model.md, independent of the
    block's code paths."""
    out = torch.zeros_like(x_TH)
    e_count = block.num_experts
    for t in range(x_TH.shape[0]):
        h = x_TH[t].double()
        if isinstance(block.gate, torch.nn.Sequential):
            logits = block.gate[2].weight.double() @ torch.tanh(block.gate[0].weight.double() @ h)
        else:
            logits = block.gate.weight.double() @ h
        vals = logits.tolist()
        if block.use_logits_norm:
            mean, std = statistics.fmean(vals), statistics.stdev(vals)
            vals = [block.norm_scale * (v - mean) / std for v in vals]
        z = max(vals)
        exps = [math.exp(v - z) for v in vals]
        probs = [p / sum(exps) for p in exps]
        chosen = sorted(range(e_count), key=lambda e: -probs[e])[: block.top_k]
        norm = sum(probs[e] for e in chosen)
        inp = h * block.top_k if block.mul_topk else h
        acc = torch.zeros_like(h)
        for e in chosen:
            w13 = block.experts.w13[e].double()
            ffn = block.experts.ffn
            y = block.experts.w2[e].double() @ (F.silu(w13[:ffn] @ inp) * (w13[ffn:] @ inp))
            acc += probs[e] / norm * y
        out[t] = acc.to(out.dtype)
    return out


def make_block(two_layer=False, mul_topk=False, use_norm=True, scale=1.0, experts=6, k=2):
    torch.manual_seed(0)
    block = MoEBlock(16, 24, experts, k, use_logits_norm=use_norm, norm_scale=scale,
                     two_layer_gate=two_layer, mul_topk=mul_topk)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.double()


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(scale=2.0),
    dict(use_norm=False),
    dict(two_layer=True),
    dict(mul_topk=True),
    dict(k=3, two_layer=True, mul_topk=True),
])
def test_block_matches_naive_reference(impl, opts):
    block = make_block(**opts)
    block.experts.impl = impl
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    got = block(x)[0].reshape(-1, 16)
    # The router runs in fp32 by design, so agreement is at fp32 precision.
    torch.testing.assert_close(got, naive_moe(block, x.reshape(-1, 16)), rtol=1e-5, atol=1e-6)


def test_two_layer_gate_uses_reference_parameter_names():
    names = {n for n, _ in make_block(two_layer=True).named_parameters()}
    assert {"gate.0.weight", "gate.2.weight"} <= names
    assert make_block(two_layer=True).gate[0].weight.shape == (8 * 6, 16)


def test_mul_topk_changes_the_output():
    a, b = make_block(mul_topk=True), make_block(mul_topk=False)
    x = torch.randn(5, 16, dtype=torch.float64)
    assert not torch.allclose(a(x)[0], b(x)[0])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_equals_loop_forward_and_backward(dtype, tol):
    torch.manual_seed(1)
    e, h, f, t, k = 8, 32, 48, 21, 2
    w13 = (torch.randn(e, 2 * f, h) * 0.2).to(dtype).requires_grad_()
    w2 = (torch.randn(e, h, f) * 0.2).to(dtype).requires_grad_()
    x = torch.randn(t, h).to(dtype).requires_grad_()
    # Random routing that never picks experts 0 and 5: they must get zero gradient, not garbage.
    ids = torch.stack([torch.randperm(6)[:k] + 1 for _ in range(t)])
    ids[ids == 5] = 7
    ids = torch.where(ids[:, :1] == ids[:, 1:], torch.stack([ids[:, 0], (ids[:, 0] % 4) + 1], 1), ids)
    weights = torch.softmax(torch.randn(t, k), -1).requires_grad_()
    results = []
    for fn in (experts_loop, experts_grouped):
        out = fn(x, w13, w2, ids, weights)
        grad_out = torch.linspace(-1, 1, out.numel()).view_as(out).to(dtype)
        grads = torch.autograd.grad(out, (x, w13, w2, weights), grad_out)
        results.append((out, *grads))
    for ref, got in zip(*results):
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    grouped_w13_grad = results[1][2]
    assert grouped_w13_grad[0].abs().max() == 0 and grouped_w13_grad[5].abs().max() == 0
    assert grouped_w13_grad[1].abs().max() > 0


def test_grouped_handles_all_tokens_on_one_expert():
    torch.manual_seed(2)
    w13, w2 = torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    x = torch.randn(5, 8)
    ids = torch.full((5, 1), 3)
    weights = torch.ones(5, 1)
    torch.testing.assert_close(experts_grouped(x, w13, w2, ids, weights),
                               experts_loop(x, w13, w2, ids, weights))


def test_grouped_mm_kernel_path_matches_per_group_matmuls():
    from skymoe.model import moe

    torch.manual_seed(3)
    counts = [40, 0, 33, 0, 25, 30]  # >= 16 rows per expert on average: the grouped kernel runs
    w = (torch.randn(6, 24, 16) * 0.3).to(torch.bfloat16).requires_grad_()
    x = torch.randn(sum(counts), 16).to(torch.bfloat16).requires_grad_()
    assert moe._use_grouped_mm(x, w)
    got = moe.grouped_linear(x, w, counts)
    ref = torch.cat([F.linear(c, w[e]) for e, c in enumerate(x.split(counts)) if counts[e]])
    grad = torch.randn_like(ref)
    g_got = torch.autograd.grad(got, (x, w), grad)
    g_ref = torch.autograd.grad(ref, (x, w), grad)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=5e-2)
    assert g_got[1][1].abs().max() == 0 and g_got[1][3].abs().max() == 0


def test_router_logits_stay_fp32_under_autocast():
    """The router runs in fp32 even inside bf16 autocast (training's mixed precision)."""
    torch.manual_seed(0)
    block = MoEBlock(16, 8, 4, 2, use_logits_norm=False, norm_scale=1.0, two_layer_gate=False,
                     mul_topk=False)
    x = torch.randn(5, 16)
    want = x @ block.gate.weight.T  # fp32 reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = block.router_logits(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
