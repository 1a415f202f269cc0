"""Parity of the sharded model with one process: every layout (DP, TP, EP, ETP, EDP and mixes,
2 and 4 gloo processes) gives the single-process losses and gradients over a few AdamW steps
(fp32, relative error < 1e-5), with capacity dropping on and off.

Each worker computes the single-process reference itself (same seed, whole batch), then runs
its shard of the batch through the parallelized model and compares its gradient shards with
the matching slices of the reference gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from skymoe.config import SkyworkMoeConfig
from skymoe.model.moe import MoEBalance, MoETrainingOptions
from skymoe.model.transformer import build_model
from skymoe.parallel.apply import parallelize, parameter_placements
from skymoe.parallel.comm import all_reduce_
from skymoe.parallel.data_parallel import DataParallel
from skymoe.parallel.experts import exchange
from skymoe.parallel.layout import ParallelLayout, split_range
from skymoe.parallel.mesh import build_mesh

from distributed import spawn

STEPS = 3
TOLERANCE = 1e-5


def tiny_config(heads: int = 6, kv_heads: int = 6) -> SkyworkMoeConfig:
    # Odd sizes on purpose: uneven splits of heads, vocabulary and intermediate size.
    return SkyworkMoeConfig(vocab_size=61, hidden_size=heads * 8, intermediate_size=22,
                            num_hidden_layers=3, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, num_experts=4,
                            num_experts_per_tok=2, moe_expert_interval=1,
                            moe_use_logits_norm=True, moe_gate_norm_std=1.0,
                            max_position_embeddings=64, torch_dtype="float32")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _train(model, batches, optimizer, balance, after_backward=None, after_step=None,
           loss_of=None, norm_of=None):
    """AdamW steps over ``batches``; returns per-step losses, the gradients of the first and
    last step, and the gradient norm of each step."""
    losses, grads, norms = [], [], []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        out = model(batch, labels=batch, balance=balance)
        loss = out.loss + out.aux_loss
        loss.backward()
        if after_backward:
            after_backward()
        losses.append(loss_of(loss) if loss_of else float(loss))
        norms.append(norm_of() if norm_of else float(torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters()])))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
        optimizer.step()
        if after_step:
            after_step()
    return losses, [grads[0], grads[-1]], norms


def _parity_worker(rank: int, world: int, layout: ParallelLayout, capacity_factor: float,
                   heads: int, kv_heads: int, a2a_chunks: int = 1, zero: bool = True) -> None:
    config = tiny_config(heads, kv_heads)
    full = build_model(config, seed=0, dtype=torch.float32)
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    balance = MoEBalance.for_layers(MoETrainingOptions(capacity_factor=capacity_factor),
                                    moe_layers, [0.01] * len(moe_layers))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (4, 16), generator=gen) for _ in range(STEPS)]
    sharded = copy.deepcopy(full)

    ref_losses, ref_grads, ref_norms = _train(full, batches,
                                              torch.optim.AdamW(full.parameters(), lr=1e-3), balance)

    mesh = build_mesh(layout)
    placements = parameter_placements(sharded, mesh)
    numel = {n: p.numel() for n, p in sharded.named_parameters()}
    parallelize(sharded, mesh, a2a_chunks)
    dp = DataParallel(sharded, mesh, placements, numel, zero=zero)
    optimizer = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    rows = split_range(4, layout.dp, mesh.coords.dp)
    local = [b[rows[0]:rows[1]] for b in batches]

    def global_loss(loss):
        return float(all_reduce_(loss.detach().clone(), mesh.dp)) / layout.dp

    losses, grads, norms = _train(sharded, local, optimizer, balance, dp.reduce_gradients,
                                  dp.broadcast_parameters, global_loss,
                                  lambda: float(dp.grad_norm()))

    for step, (got, want) in enumerate(zip(losses, ref_losses)):
        assert abs(got - want) / abs(want) < TOLERANCE, (layout.name, step, got, want)
    for step, (got, want) in enumerate(zip(norms, ref_norms)):  # what clipping sees
        assert abs(got - want) / want < TOLERANCE, (layout.name, "grad norm", step, got, want)
    checked = 0
    for got_grads, want_grads in zip(grads, ref_grads):
        for name, g in got_grads.items():
            want = placements[name].take(want_grads[name])
            assert g.shape == want.shape, (layout.name, name, g.shape, want.shape)
            err = rel_err(g, want)
            assert err < TOLERANCE, (layout.name, name, err)
            checked += 1
    # Every gradient element is owned (and so checked) somewhere.
    total = torch.tensor([checked])
    dist.all_reduce(total)
    assert int(total) >= 2 * len(numel), (layout.name, int(total))


LAYOUTS_2 = [
    ParallelLayout(dp=2),
    ParallelLayout(tp=2),
    ParallelLayout(dp=2, ep=2),            # EP over data ranks
    ParallelLayout(tp=2, ep=2),            # EDP: the EP group is the TP group
    ParallelLayout(tp=2, etp=2),           # experts tensor-split over TP
]
LAYOUTS_4 = [
    ParallelLayout(dp=4, ep=4),
    ParallelLayout(dp=2, tp=2, ep=2),      # EDP
    ParallelLayout(dp=2, tp=2, ep=4),      # Megatron EP over DP x TP
    ParallelLayout(dp=2, tp=2, ep=2, etp=2),  # ETP
    ParallelLayout(tp=4, ep=2),            # EP inside a TP group of 4, EDP size 2
]


@pytest.mark.parametrize("capacity_factor", [1.0, 0.0], ids=["drop", "dropless"])
@pytest.mark.parametrize("layout", LAYOUTS_2, ids=lambda l: l.name)
def test_parity_two_processes(layout, capacity_factor):
    spawn(_parity_worker, 2, layout, capacity_factor, 6, 6)


@pytest.mark.parametrize("capacity_factor", [1.0, 0.0], ids=["drop", "dropless"])
@pytest.mark.parametrize("layout", LAYOUTS_4, ids=lambda l: l.name)
def test_parity_four_processes(layout, capacity_factor):
    spawn(_parity_worker, 4, layout, capacity_factor, 6, 6)


def test_parity_grouped_query_attention_uneven_heads():
    # 3 KV heads over 2 ranks: 2 and 1 KV heads, 4 and 2 query heads.
    spawn(_parity_worker, 2, ParallelLayout(tp=2, ep=2), 1.0, 6, 3)


def _round_trip_worker(rank: int, world: int, chunks: int) -> None:
    mesh = build_mesh(ParallelLayout(dp=world, ep=world))
    experts = 2 * world
    gen = torch.Generator().manual_seed(rank)
    counts = torch.randint(0, 5, (experts,), generator=gen).tolist()
    counts[rank] = 0  # an expert that gets nothing from this rank
    x = torch.randn(sum(counts), 3, generator=gen, requires_grad=True)
    expert_of_row = torch.repeat_interleave(torch.arange(experts), torch.tensor(counts))
    seen = []

    def identity(rows, local_counts, first):
        seen.append(local_counts)
        return rows

    y = exchange(x, counts, mesh.ep, identity, chunks)
    assert torch.equal(y, x)  # bit-exact round trip
    upstream = torch.randn(y.shape, generator=gen)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)

    # Rows reach the rank that holds their expert, grouped by local expert.
    def tag_by_expert(rows, local_counts, first):
        local = first + torch.repeat_interleave(torch.arange(len(local_counts)),
                                                torch.tensor(local_counts))
        return rows * 0 + (rank * 2 + local)[:, None].float()  # 2 experts per rank

    tagged = exchange(x.detach(), counts, mesh.ep, tag_by_expert, chunks)
    assert torch.equal(tagged[:, 0], expert_of_row.float())
    # Each rank received, for each of its experts, the sum of what all ranks sent it.
    totals = torch.tensor(counts)
    dist.all_reduce(totals)
    assert sum(seen, []) == totals.view(world, -1)[rank].tolist()


@pytest.mark.parametrize("world, chunks", [(2, 1), (4, 1), (2, 2)])
def test_dispatcher_round_trip_is_exact(world, chunks):
    spawn(_round_trip_worker, world, chunks)


def test_parity_without_zero():
    # Optimizer state replicated over DP: every replica steps, the norm counts one of them.
    spawn(_parity_worker, 4, ParallelLayout(dp=2, tp=2, ep=2), 1.0, 6, 6, 1, False)


def test_parity_with_the_all_to_all_pipelined_in_chunks():
    spawn(_parity_worker, 2, ParallelLayout(tp=2, ep=2), 1.0, 6, 6, 2)
