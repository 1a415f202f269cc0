"""Capacity, token dropping, balance losses and the adaptive coefficient rule, against hand
computations; the MoE block's training path against the reference loop."""

import math

import pytest
import torch

from skymoe.model import balance
from skymoe.model.moe import MoEBlock, MoETrainingOptions, experts_grouped, experts_loop


def test_expert_capacity_by_hand():
    assert balance.expert_capacity(10, 4, 2, 1.0) == 5          # 1.0 * 2 * 10 / 4
    assert balance.expert_capacity(7, 4, 2, 1.25) == 5          # ceil(4.375)
    assert balance.expert_capacity(512, 16, 2, 1.5) == 96       # 1.5 * 2 * 512 / 16
    assert balance.expert_capacity(10, 4, 2, 0.0) is None       # dropless
    assert balance.expert_capacity(10, 4, 2, -1.0) is None


def _keep(ids, probs, capacity, policy, groups=None):
    ids_TK = torch.tensor(ids)
    group_TK = torch.zeros_like(ids_TK) if groups is None else torch.tensor(groups)
    n_groups = int(group_TK.max()) + 1
    return balance.capacity_keep_mask(ids_TK, torch.tensor(probs), group_TK, 2,
                                      torch.tensor([capacity] * n_groups), policy).tolist()


# Four tokens, top-1, every token wants expert 0; its probabilities 0.6, 0.9, 0.7, 0.8.
ALL_TO_ZERO = [[0], [0], [0], [0]]
PROBS = [[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]]


def test_probability_policy_keeps_the_most_confident_assignments():
    assert _keep(ALL_TO_ZERO, PROBS, 2, "probability") == [[False], [True], [False], [True]]


def test_position_policy_keeps_the_earliest_tokens():
    assert _keep(ALL_TO_ZERO, PROBS, 2, "position") == [[True], [True], [False], [False]]


def test_capacity_is_per_group_and_per_expert():
    # Top-2 over 2 experts: every token uses both. Groups {0, 1} and {2, 3}; capacity 1 per
    # (group, expert). Probability policy: expert 0 goes to token 1 (0.9 > 0.6) and token 2
    # (0.3 > 0.2), expert 1 to token 0 (0.4 > 0.1) and token 3 (0.8 > 0.7). Position policy:
    # the first token of each group keeps both.
    ids = [[0, 1], [0, 1], [1, 0], [1, 0]]
    probs = [[0.6, 0.4], [0.9, 0.1], [0.3, 0.7], [0.2, 0.8]]
    groups = [[0, 0], [0, 0], [1, 1], [1, 1]]
    assert _keep(ids, probs, 1, "probability", groups) == [[False, True], [True, False],
                                                           [False, True], [True, False]]
    assert _keep(ids, probs, 1, "position", groups) == [[True, True], [False, False],
                                                        [True, True], [False, False]]


def test_unknown_drop_policy():
    with pytest.raises(ValueError, match="drop policy"):
        _keep(ALL_TO_ZERO, PROBS, 2, "random")


P = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]  # mean gate probabilities [0.4, 0.4, 0.2]


def test_skywork_aux_loss_by_hand():
    expected = 2 * (1 / 3 - 0.4) ** 2 + (1 / 3 - 0.2) ** 2  # = 0.0266...
    got = balance.aux_loss(torch.tensor(P), torch.tensor([[0], [1]]), "skywork")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    flat = balance.aux_loss(torch.full((5, 4), 0.25), torch.zeros(5, 1, dtype=torch.long))
    assert flat.item() == 0.0


def test_switch_aux_loss_by_hand():
    # Top-1 choices experts 0 and 1: f = [1/2, 1/2, 0]; E * sum f * P = 3 * (0.2 + 0.2) = 1.2.
    got = balance.aux_loss(torch.tensor(P), torch.tensor([[0], [1]]), "switch")
    assert got.item() == pytest.approx(1.2, rel=1e-6)
    # Perfect balance gives exactly 1: top-2 of 2 experts, flat probabilities.
    even = balance.aux_loss(torch.full((4, 2), 0.5), torch.tensor([[0, 1]] * 4), "switch")
    assert even.item() == pytest.approx(1.0)


def test_aux_loss_is_a_token_weighted_mean_over_groups():
    # Group 0 = tokens 0, 1 (the P above, loss 0.02667); group 1 = token 2 alone, [1, 0, 0]
    # (loss (1/3-1)^2 + 2 (1/3)^2 = 2/3). Weighted: (2 * 0.02667 + 1 * 2/3) / 3.
    probs = torch.tensor(P + [[1.0, 0.0, 0.0]])
    group0 = 2 * (1 / 3 - 0.4) ** 2 + (1 / 3 - 0.2) ** 2
    got = balance.aux_loss(probs, torch.tensor([[0], [1], [0]]), "skywork",
                           torch.tensor([0, 0, 1]), num_groups=2)
    assert got.item() == pytest.approx((2 * group0 + 2 / 3) / 3, rel=1e-6)


def test_router_z_loss_and_sharpness_by_hand():
    z = balance.router_z_loss(torch.tensor([[0.0, math.log(3.0)]]))
    assert z.item() == pytest.approx(math.log(4.0) ** 2, rel=1e-6)
    m12, m23 = balance.gate_sharpness(torch.tensor([[0.5, 0.25, 0.125, 0.125],
                                                    [0.1, 0.6, 0.2, 0.1]]))
    assert m12.item() == pytest.approx(2.0 + 3.0) and m23.item() == pytest.approx(2.0 + 2.0)


def test_adaptive_coefficient_update_and_cap():
    # d = 3%: target 0.2 * 0.03 = 0.006; 0.99 * 0.001 + 0.01 * 0.006 = 0.00105.
    assert balance.updated_aux_coef(0.001, 0.03) == pytest.approx(0.00105)
    # d = 50%: the target is capped at alpha_max = 0.01: 0.99 * 0.002 + 0.01 * 0.01 = 0.00208.
    assert balance.updated_aux_coef(0.002, 0.5) == pytest.approx(0.00208)
    # The cap binds from d = 5% (xi * d = alpha_max) on.
    assert balance.updated_aux_coef(0.0, 0.05) == balance.updated_aux_coef(0.0, 0.9)
    ctrl = balance.AuxCoefController(2, initial=0.001)
    assert ctrl.step([0.03, 0.5]) == pytest.approx([0.00105, 0.99 * 0.001 + 0.0001])
    fixed = balance.AuxCoefController(2, initial=0.004, adaptive=False)
    assert fixed.step([0.3, 0.0]) == [0.004, 0.004]
    restored = balance.AuxCoefController(2, initial=0.0)
    restored.load_state_dict(ctrl.state_dict())
    assert restored.step([0.1, 0.1]) == ctrl.step([0.1, 0.1])


def test_dropped_assignments_contribute_nothing():
    torch.manual_seed(0)
    x = torch.randn(40, 16, dtype=torch.float64)
    w13 = torch.randn(4, 24, 16, dtype=torch.float64)
    w2 = torch.randn(4, 16, 12, dtype=torch.float64)
    ids = torch.randint(0, 4, (40, 2))
    ids[:, 1] = (ids[:, 0] + 1) % 4
    weights = torch.rand(40, 2, dtype=torch.float64)
    keep = torch.rand(40, 2) > 0.4
    keep[:5] = False  # tokens whose every assignment was dropped
    for impl in (experts_loop, experts_grouped):
        out = impl(x, w13, w2, ids, weights, keep)
        assert torch.equal(out[:5], torch.zeros(5, 16, dtype=torch.float64))
        # Same as running only the kept assignments with the dropped weights at zero.
        expected = experts_loop(x, w13, w2, ids, weights * keep)
        torch.testing.assert_close(out, expected)


def _block(num_experts=8, seed=0):
    torch.manual_seed(seed)
    block = MoEBlock(32, 48, num_experts, 2, use_logits_norm=True, norm_scale=1.0,
                     two_layer_gate=False, mul_topk=False)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return block.double()


def test_block_training_forward_drop_rate_and_grouped_equals_loop():
    block = _block()
    block.train()
    options = MoETrainingOptions(capacity_factor=1.0, routing_group_size=1)
    x = torch.randn(3, 20, 32, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for impl in ("loop", "grouped"):
        block.experts.impl = impl
        x.grad = None
        block.zero_grad()
        y, moe = block(x, options, aux_coef=0.01)
        (y.square().sum() + moe.aux).backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # Drop rate from an independent count: each sequence (20 tokens) is a group with capacity
    # ceil(2 * 20 / 8) = 5 per expert; assignments beyond 5 per (sequence, expert) are dropped.
    ids = block.routing(x.detach().reshape(-1, 32)).expert_ids_TK.view(3, 20 * 2)
    dropped = sum(max(0, int((seq == e).sum()) - 5) for seq in ids for e in range(8))
    stats = moe.stats
    assert stats.dropped.item() == dropped > 0
    assert stats.load.sum().item() == 3 * 20 * 2


def test_eval_mode_and_dropless_route_everything():
    block = _block()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    block.eval()
    reference, moe = block(x, MoETrainingOptions(capacity_factor=0.5))
    assert moe is None  # inference: no dropping, no statistics
    block.train()
    y, moe = block(x, MoETrainingOptions(capacity_factor=0.0))
    torch.testing.assert_close(y, reference)
    assert moe.stats.dropped.item() == 0
