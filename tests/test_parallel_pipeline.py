"""Pipeline parallelism (torch.distributed.pipelining schedules over ``PipelineStages``)
gives the single-process training step: losses, gradient norms, gradients and MoE drop rates
of three steps match (fp32, relative error < 1e-5) for uneven layouts over 2 and 4 stages,
with and without recomputation, with tensor/expert parallelism inside stages, and with two
stages per rank (interleaved 1F1B, zero-bubble, ZBV).

Each worker computes the single-process reference itself (same seed, the same micro-batches
accumulated with equal shares), then runs its stages. The steps are SGD: AdamW turns the
last-bit differences of a reordered sum (TP all-reduces) into whole-learning-rate steps on
elements whose gradient is near zero, which says nothing about the pipeline; the trainer's
AdamW under a pipeline is checked end to end in test_parallel_train.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from skymoe.config import SkyworkMoeConfig
from skymoe.errors import ConfigError
from skymoe.model.moe import MoEBalance, MoEStats, MoETrainingOptions
from skymoe.model.transformer import build_model
from skymoe.parallel.apply import parallelize, parameter_placements
from skymoe.parallel.data_parallel import DataParallel
from skymoe.parallel.layout import ParallelLayout, split_range
from skymoe.parallel.mesh import build_mesh, local_mesh
from skymoe.parallel.pipeline import PipelineStages, build_schedule
from skymoe.parallel.schedules import stages_of_rank
from skymoe.parallel.pipeline_layout import PipelineLayout
from skymoe.train import config as train_config
from skymoe.train.metrics import MoEStepStats
from skymoe.train.step import PipelineSteps, accumulate_gradients

from distributed import spawn

STEPS = 3
TOLERANCE = 1e-5
ROWS, MICRO, SEQ = 8, 2, 16  # the global batch and the micro-batch size, tokens per row


def pipeline_config(tied: bool = False) -> SkyworkMoeConfig:
    # 5 layers, MoE at 1 and 3 and dense elsewhere; odd sizes for uneven TP splits.
    return SkyworkMoeConfig(vocab_size=61, hidden_size=48, intermediate_size=22,
                            tie_word_embeddings=tied,
                            num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=6,
                            num_experts=4, num_experts_per_tok=2, moe_expert_interval=2,
                            moe_use_logits_norm=True, moe_gate_norm_std=1.0,
                            max_position_embeddings=64, torch_dtype="float32")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _reference(model, batches, micro, balance):
    """Single-process steps: micro-batches of ``micro`` rows, each loss scaled by its share."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads, norms, drops = [], [], [], []
    moe_layers = sorted(balance.coefs)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        total, stats = 0.0, MoEStepStats(moe_layers)
        parts = batch.split(micro)
        for part in parts:
            out = model(part, labels=part, balance=balance)
            loss = (out.loss + out.aux_loss) / len(parts)
            loss.backward()
            total += float(loss.detach())
            stats.add(out.moe_stats)
        losses.append(total)
        drops.append(stats.drop_rates())
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
    return losses, grads, norms, drops


def _pipeline_worker(rank: int, world: int, layout: ParallelLayout, stages: PipelineLayout,
                     schedule: str, tied: bool = False) -> None:
    config = pipeline_config(tied)
    full = build_model(config, seed=0, dtype=torch.float32)
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    balance = MoEBalance.for_layers(MoETrainingOptions(capacity_factor=1.0), moe_layers,
                                    [0.01 * (j + 1) for j in range(len(moe_layers))])
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (ROWS, SEQ), generator=gen)
               for _ in range(STEPS)]
    staged = copy.deepcopy(full)
    ref_losses, ref_grads, ref_norms, ref_drops = _reference(full, batches, MICRO, balance)

    mesh = build_mesh(layout)
    on_rank = stages_of_rank(schedule, mesh.coords.pp, layout.pp, stages.stages)
    pipeline = PipelineStages(staged, stages, on_rank)
    stage = pipeline.model.train()  # each stage picks its layers' coefficients
    placements = parameter_placements(stage, mesh)
    numel = {n: p.numel() for n, p in stage.named_parameters()}
    parallelize(stage, mesh)
    dp = DataParallel(stage, mesh, placements, numel, counted_elsewhere=pipeline.tied_copies)
    optimizer = torch.optim.SGD(stage.parameters(), lr=0.1)
    rows = split_range(ROWS, layout.dp, mesh.coords.dp)
    micro_batches = (rows[1] - rows[0]) // MICRO
    pipe = PipelineSteps(build_schedule(pipeline, mesh, micro_batches, MICRO, SEQ, schedule))
    stats = MoEStepStats(moe_layers)
    for step, batch in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        stats.reset()
        loss, _ = accumulate_gradients(pipe, batch[rows[0]:rows[1]], balance, dp, stats)
        norm = float(dp.grad_norm())
        assert abs(loss - ref_losses[step]) / abs(ref_losses[step]) < TOLERANCE, \
            (stages, step, loss, ref_losses[step])
        assert abs(norm - ref_norms[step]) / ref_norms[step] < TOLERANCE, (stages, step, norm)
        assert stats.drop_rates() == pytest.approx(ref_drops[step], abs=1e-7)
        for name, p in stage.named_parameters():
            if p.grad is None:  # ZeRO-1: another rank of the replica group owns it
                continue
            # A tied LM head on the last stage is the embedding of the single model.
            want = ref_grads[step].get(name, ref_grads[step].get("model.embed_tokens.weight"))
            err = rel_err(p.grad, placements[name].take(want))
            assert err < TOLERANCE, (stages, step, name, err)
        optimizer.step()
        dp.broadcast_parameters()
    # The stage holds exactly its layers (and the embedding / head on the end stages).
    names = {n.split(".")[2] for n, _ in stage.named_parameters() if ".layers." in n}
    assert names == {str(i) for s in on_rank for i in stages.stage_layers(s)}
    held = torch.tensor([float(sum(p.numel() for p in stage.parameters()))])
    dist.all_reduce(held)
    assert held.item() >= sum(p.numel() for p in full.parameters())


CASES_2 = [
    (ParallelLayout(pp=2), PipelineLayout((3, 2)), "1f1b"),
    (ParallelLayout(pp=2), PipelineLayout((1, 4), (1, 2)), "1f1b"),
    (ParallelLayout(pp=2), PipelineLayout((5, 0), (3, 0)), "gpipe"),
    # Two stages per rank: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3 ...
    (ParallelLayout(pp=2), PipelineLayout((1, 2, 1, 1), (0, 1, 0, 0)), "interleaved-1f1b"),
    (ParallelLayout(pp=2), PipelineLayout((2, 1, 1, 1)), "zero-bubble"),
    # ... or in a V: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2.
    (ParallelLayout(pp=2), PipelineLayout((1, 2, 1, 1)), "zbv"),
]
CASES_4 = [
    (ParallelLayout(pp=4), PipelineLayout((0, 2, 2, 1), (0, 1, 0, 1)), "1f1b"),
    (ParallelLayout(pp=2, dp=2, ep=2), PipelineLayout((3, 2), (1, 0)), "1f1b"),   # EP in stages
    (ParallelLayout(pp=2, tp=2, ep=2), PipelineLayout((2, 3), (0, 3)), "1f1b"),   # TP + EDP
]


def _case_id(case) -> str:
    layout, stages, schedule = case
    return f"{layout.name}-{stages.describe()}-{schedule}".replace(" ", "_")


@pytest.mark.parametrize("case", CASES_2, ids=_case_id)
def test_pipeline_parity_two_stages(case):
    spawn(_pipeline_worker, 2, *case)


@pytest.mark.parametrize("case", [
    (ParallelLayout(pp=2), PipelineLayout((3, 2)), "1f1b"),     # the two copies on two ranks
    (ParallelLayout(pp=2), PipelineLayout((1, 2, 1, 1)), "zbv"),  # both ends on rank 0
], ids=_case_id)
def test_pipeline_parity_tied_embeddings(case):
    spawn(_pipeline_worker, 2, *case, True)


@pytest.mark.parametrize("case", CASES_4, ids=_case_id)
def test_pipeline_parity_four_processes(case):
    spawn(_pipeline_worker, 4, *case)


def test_zero_stats_match_a_real_forward():
    config = pipeline_config()
    model = build_model(config, seed=0, dtype=torch.float32).train()
    balance = MoEBalance(MoETrainingOptions(capacity_factor=1.0), {})
    out = model(torch.randint(0, config.vocab_size, (2, 8)), labels=None, balance=balance)
    real, zeros = out.moe_stats[1], MoEStats.zeros(config.num_experts)
    assert [t.shape for t in real.tensors()] == [t.shape for t in zeros.tensors()]


def test_stage_model_rejects_bad_layouts():
    model = build_model(pipeline_config(), seed=0)
    with pytest.raises(ConfigError, match="sum to 5"):
        PipelineStages(model, PipelineLayout((3, 3)), 0)
    with pytest.raises(ConfigError, match="stage 1 .* has no layers"):
        PipelineStages(model, PipelineLayout((3, 0, 2)), 0)
    with pytest.raises(ConfigError, match="recomputes 3 layers but holds 2"):
        PipelineStages(model, PipelineLayout((3, 2), (0, 3)), 0)


def test_schedules_place_stages_on_ranks():
    model = build_model(pipeline_config(), seed=0)
    stage = PipelineStages(model, PipelineLayout((3, 2)), 0)
    mesh = local_mesh()
    with pytest.raises(ConfigError, match="unknown pipeline schedule 'zb'"):
        build_schedule(stage, mesh, 4, MICRO, SEQ, "zb")
    with pytest.raises(ConfigError, match=r"runs stages \[0, 1\] on pipeline rank 0, but "
                                          r"this rank's model holds \[0\]"):
        build_schedule(stage, mesh, 4, MICRO, SEQ, "zbv")
    with pytest.raises(ConfigError, match="runs two stages per pipeline rank, but the layout "
                                          "has 2 stages for 2 ranks"):
        stages_of_rank("zbv", 0, 2, 2)
    with pytest.raises(ConfigError, match="runs one stage per pipeline rank"):
        stages_of_rank("1f1b", 0, 2, 4)
    assert stages_of_rank("zbv", 1, 4, 8) == [1, 6]
    assert stages_of_rank("interleaved-1f1b", 1, 4, 12) == [1, 5, 9]


def test_training_config_pipeline_layouts():
    cfg = train_config.load(None, ["parallel.pp=2", "parallel.pp_layers=4,1",
                                   "parallel.pp_recompute=2,0"])
    assert cfg.layout().pp == 2
    assert cfg.pipeline_layout(5) == PipelineLayout((4, 1), (2, 0))
    cfg = train_config.from_dict({"parallel": {"pp": 2, "pp_layers": [1, 4]}})  # TOML lists
    assert cfg.pipeline_layout(5) == PipelineLayout((1, 4))
    cfg = train_config.load(None, ["parallel.pp=2", "parallel.pp_stages_per_rank=2",
                                   "parallel.pp_schedule=interleaved-1f1b"])
    assert cfg.pipeline_layout(5) == PipelineLayout((2, 1, 1, 1))
    # Defaults: the even split, every layer recomputed under activation checkpointing.
    cfg = train_config.load(None, ["parallel.pp=2", "train.activation_checkpointing=true"])
    assert cfg.pipeline_layout(5) == PipelineLayout((3, 2), (3, 2))
    for overrides, message in [
            (["parallel.pp=3", "parallel.pp_layers=4,1"],
             r"has 2 stages .* parallel.pp \* parallel.pp_stages_per_rank = 3"),
            (["parallel.pp=2", "parallel.pp_layers=4,2"], "places 6 layers .* must sum to 5"),
            (["parallel.pp=2", "parallel.pp_layers=4;1"], "comma-separated integers"),
            (["parallel.pp=2", "parallel.pp_recompute=1"], "1 entries for 2 stages")]:
        with pytest.raises(ConfigError, match=message):
            train_config.load(None, overrides).pipeline_layout(5)
    with pytest.raises(ConfigError, match="pp_schedule must be one of"):
        train_config.load(None, ["parallel.pp_schedule=zb"])
