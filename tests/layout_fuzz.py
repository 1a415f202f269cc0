"""Random small training cases for the layout fuzz test (``test_layout_fuzz.py``).

A case is drawn from a seed: a tiny model (layers, experts, top-k, heads, odd vocabulary and
intermediate sizes, gating normalization, gate variants, tied embeddings, a routing bias), the
MoE training options (capacity factor or dropless, drop policy, routing group, aux-loss type
including the global-batch loss, z-loss),
sequence length, micro-batch size and gradient accumulation, and activation checkpointing.
``run_cases`` trains each case for ``STEPS`` SGD steps on one process (the reference, plain
code) and under each layout through the trainer's step functions, and reports every
difference beyond ``TOLERANCE`` in losses, gradient norms, drop rates or gradients. Only
what one fp32 process itself reproduces to ``UNDETERMINED`` (against an fp64 run of the
same case) is compared; the rest (ill-conditioned quantities, e.g. a gradient whose true
value is about zero) is counted.

A layout sums some terms in another order, so its router probabilities differ from one
process's in the last bits. Where the reference itself decides a routing choice by less than
``TIE`` (the k-th and (k+1)-th probability of a token, or the last kept and first dropped
assignment of a full expert), the other order may decide it the other way: such a case's
differences are reported as near-ties, not failures.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from skymoe.config import SkyworkMoeConfig
from skymoe.errors import ConfigError
from skymoe.model import balance
from skymoe.model.lora import TARGETS as LORA_TARGETS, LoRAConfig, add_lora, lora_parameters
from skymoe.model.moe import MoEBalance, MoETrainingOptions
from skymoe.model.transformer import build_model
from skymoe.parallel.apply import parallelize, parameter_placements
from skymoe.parallel.data_parallel import DataParallel
from skymoe.parallel.layout import ParallelLayout, split_range
from skymoe.parallel.mesh import ParallelMesh, build_mesh
from skymoe.parallel.pipeline import PipelineStages, build_schedule
from skymoe.parallel.schedules import stages_of_rank
from skymoe.parallel.pipeline_layout import PipelineLayout
from skymoe.train.metrics import MoEStepStats
from skymoe.train.step import MicroBatchLoop, PipelineSteps, accumulate_gradients

STEPS = 2
TOLERANCE = 1e-5
LR = 0.1
TOKEN_BUDGET = 1024  # tokens per step, so a case runs in seconds
TIE = 1e-5  # routing decisions closer than this (in probability) may go either way
UNDETERMINED = TOLERANCE / 10  # compared: what one fp32 process reproduces 10x closer (vs fp64)

# Every layout 2 processes can form, and a few of 4 (EP/EDP/ETP inside DP x TP and a pipeline).
LAYOUTS = {
    2: [ParallelLayout(dp=2), ParallelLayout(tp=2), ParallelLayout(dp=2, ep=2),
        ParallelLayout(tp=2, ep=2), ParallelLayout(tp=2, etp=2), ParallelLayout(pp=2)],
    4: [ParallelLayout(dp=2, tp=2, ep=2), ParallelLayout(dp=2, tp=2, ep=4),
        ParallelLayout(dp=2, tp=2, ep=2, etp=2), ParallelLayout(pp=2, tp=2, ep=2),
        ParallelLayout(pp=2, dp=2, ep=2)],
}
SCHEDULES_ONE_STAGE = ("1f1b", "gpipe")
SCHEDULES_TWO_STAGES = ("interleaved-1f1b", "looped-bfs", "zero-bubble", "zbv")


@dataclass
class Case:
    """One random training setting; ``pipe`` and ``schedule`` apply to pipeline layouts."""

    seed: int
    config: SkyworkMoeConfig
    options: MoETrainingOptions
    aux_coefs: list[float]
    seq_len: int
    micro: int       # rows per micro-batch (per process)
    accum: int       # micro-batches per data-parallel rank of 2
    recompute: bool  # activation checkpointing of every layer
    pipe: PipelineLayout
    schedule: str
    distinct_tokens: int  # the batches draw from this many token ids (few: skewed routing)
    gate_scale: float     # router weights scaled at init (large: sharp, skewed routing)
    # Route every token to the last two experts (by the sign of one feature): the experts of
    # every other expert-parallel rank receive no rows.
    last_experts_only: bool = False
    expert_bias: bool = False  # a random routing bias in every MoE block
    lora: bool = False  # a frozen base with LoRA on every target (``_add_lora``)

    @property
    def rows(self) -> int:  # the global batch: two data-parallel shares
        return 2 * self.micro * self.accum

    def describe(self) -> str:
        c, o = self.config, self.options
        return (f"case seed={self.seed}: layers={c.num_hidden_layers} "
                f"moe_interval={c.moe_expert_interval} experts={c.num_experts} "
                f"top_k={c.num_experts_per_tok} heads={c.num_attention_heads}/"
                f"{c.num_key_value_heads} hidden={c.hidden_size} ffn={c.intermediate_size} "
                f"vocab={c.vocab_size} norm={c.moe_use_logits_norm} "
                f"gate2={c.moe_2layer_gate} mul_topk={not c.moe_feature_no_mul_topk} "
                f"tied={c.tie_word_embeddings} seq={self.seq_len} micro={self.micro} "
                f"accum={self.accum} capacity={o.capacity_factor} drop={o.drop_policy} "
                f"group={o.routing_group_size} aux={o.aux_loss} z={o.z_loss_coef} "
                f"bias={self.expert_bias} lora={self.lora} "
                f"recompute={self.recompute} pipe={self.pipe.describe()} {self.schedule} "
                f"distinct_tokens={self.distinct_tokens} gate_scale={self.gate_scale}")


def draw_case(seed: int, world: int = 2) -> Case:
    """The case of ``seed`` (the same on every process). Cases for 4 processes have an even
    number of experts: every 4-process layout splits the experts over 2 or 4 ranks."""
    rng = random.Random(seed)
    layers = rng.randint(2, 4)
    experts = rng.randrange(2, 17, 2) if world == 4 else rng.randint(2, 16)
    kv_heads = rng.randint(2, 4)
    heads = kv_heads * rng.choice([1, 2])
    seq_len = rng.randint(16, 256)
    pairs = [(m, a) for m in range(1, 5) for a in range(1, 5)
             if 2 * m * a * seq_len <= TOKEN_BUDGET]
    micro, accum = rng.choice(pairs)
    config = SkyworkMoeConfig(
        vocab_size=rng.randrange(33, 301, 2), hidden_size=heads * rng.choice([4, 8]),
        intermediate_size=rng.randint(6, 40), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, num_experts=experts,
        num_experts_per_tok=rng.randint(1, min(2, experts)),
        moe_expert_interval=rng.choice([1, 2]),
        # Gating normalization of 2 experts keeps only the sign of their logit difference:
        # routing becomes a step function of rounding, which no two summation orders share.
        moe_use_logits_norm=rng.random() < 0.5 and experts >= 3,
        moe_gate_norm_std=rng.choice([1.0, 2.5]), moe_2layer_gate=rng.random() < 0.3,
        moe_feature_no_mul_topk=rng.random() < 0.5, tie_word_embeddings=rng.random() < 0.3,
        max_position_embeddings=256, torch_dtype="float32")
    options = MoETrainingOptions(
        capacity_factor=0.0 if rng.random() < 0.3 else round(rng.uniform(0.5, 2.0), 2),
        drop_policy=rng.choice(balance.DROP_POLICIES), aux_loss=rng.choice(balance.AUX_LOSS_TYPES),
        z_loss_coef=rng.choice([0.0, 1e-3]), routing_group_size=rng.choice([1, 0]))
    moe_layers = sum(config.is_moe_layer(i) for i in range(layers))
    recompute = rng.random() < 0.5
    schedule = rng.choice(SCHEDULES_ONE_STAGE + SCHEDULES_TWO_STAGES)
    stages = 2 if schedule in SCHEDULES_ONE_STAGE else 4
    pipe = _draw_pipeline(rng, layers, stages, recompute)
    # Skewed routing (a rank whose experts receive no rows, experts over capacity) is where
    # data-dependent behaviour hides: often few distinct tokens and a sharp router. Few
    # distinct tokens repeat whole contexts, whose tokens then tie exactly for an expert's
    # last places: those cases drop by position.
    # (At least 2: with one token attention averages equal values and the query and key
    # gradients are pure rounding.)
    distinct = rng.choice([config.vocab_size, rng.randint(2, 4)])
    if distinct < config.vocab_size:
        options.drop_policy = "position"
    case = Case(seed, config, options, [round(rng.uniform(1e-3, 5e-2), 4)] * moe_layers,
                seq_len, micro, accum, recompute, pipe, schedule, distinct,
                rng.choice([1.0, 30.0]))
    # Settings added later come from a second generator, so the earlier ones (and the seeds
    # chosen for them) stay as they were.
    later = random.Random(f"later-{seed}")
    if later.random() < 0.3:
        options.aux_loss = "global"
    case.expert_bias = later.random() < 0.3
    return case


def _draw_pipeline(rng: random.Random, layers: int, stages: int,
                   recompute: bool) -> PipelineLayout:
    """Layers per stage (the middle stages at least one, the end ones possibly none) and,
    with recomputation, a random number of recomputed layers per stage."""
    middle = stages - 2  # every case has at least 2 layers
    counts = [0] * stages
    for s in range(1, stages - 1):
        counts[s] = 1
    for _ in range(layers - middle):
        counts[rng.randrange(stages)] += 1
    redo = [rng.randint(0, n) if recompute else 0 for n in counts]
    return PipelineLayout(tuple(counts), tuple(redo))


@dataclass
class StepRecord:
    margin: float = float("inf")  # the closest routing decision (the reference's)
    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    drops: list[list[float]] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)


def _base_model(case: Case, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = build_model(case.config, seed=case.seed, dtype=dtype).train()
    model.activation_checkpointing = case.recompute
    with torch.no_grad():
        for block in model.moe_blocks():
            for p in block.gate.parameters():
                p.mul_(case.gate_scale)
            if case.last_experts_only:  # a one-layer gate
                block.gate.weight.zero_()
                block.gate.weight[-2:, 0] = torch.tensor([5.0, -5.0])
    if case.expert_bias:
        model.enable_expert_bias()
        gen = torch.Generator().manual_seed(case.seed)
        for block in model.moe_blocks():
            block.expert_bias.copy_(0.2 * torch.randn(block.num_experts, generator=gen))
    if case.lora:
        _add_lora(model, case.seed)
    return model


def _add_lora(model: torch.nn.Module, seed: int) -> None:
    """Adapters of a random rank on every target, the router trained or not, and ``B`` drawn
    at random (not zero), so every factor, ``A`` included, has a gradient."""
    rng = random.Random(f"lora-{seed}")
    add_lora(model, LoRAConfig(rank=rng.randint(1, 4), alpha=rng.choice([1.0, 8.0]),
                               targets=LORA_TARGETS, train_router=rng.random() < 0.5), seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if name.endswith("B"):
                p.normal_(0.0, 0.3, generator=gen)


def _batches(case: Case) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed)
    tokens = torch.randperm(case.config.vocab_size, generator=gen)[:case.distinct_tokens]
    return [tokens[torch.randint(0, len(tokens), (case.rows, case.seq_len), generator=gen)]
            for _ in range(STEPS)]


def _moe_layers(case: Case) -> list[int]:
    return [i for i in range(case.config.num_hidden_layers) if case.config.is_moe_layer(i)]


def _balance(case: Case) -> MoEBalance:
    return MoEBalance.for_layers(case.options, _moe_layers(case), case.aux_coefs)


def _decision_margin(probs_TE: torch.Tensor, bias_E: torch.Tensor | None, case: Case,
                     seqs: int) -> float:
    """How close the routing decisions of one MoE forward are: the smallest gap between a
    token's k-th and (k+1)-th routing score (probability plus bias), and (probability drop
    policy) between the last kept and the first dropped assignment of an expert over
    capacity."""
    k, experts = case.config.num_experts_per_tok, case.config.num_experts
    scores_TE = probs_TE if bias_E is None else probs_TE + bias_E
    top = torch.sort(scores_TE, dim=-1, descending=True).values
    margin = float((top[:, k - 1] - top[:, k]).min()) if experts > k else float("inf")
    if case.options.capacity_factor <= 0 or case.options.drop_policy != "probability":
        return margin
    ids_TK = torch.topk(scores_TE, k, dim=-1).indices
    groups = seqs // case.options.routing_group_size if case.options.routing_group_size else 1
    for probs_G, ids_G in zip(probs_TE.chunk(groups), ids_TK.chunk(groups)):
        capacity = balance.expert_capacity(probs_G.shape[0], experts, k,
                                           case.options.capacity_factor)
        for e in range(experts):
            chosen = torch.sort(probs_G[:, e][(ids_G == e).any(-1)], descending=True).values
            if len(chosen) > capacity:
                margin = min(margin, float(chosen[capacity - 1] - chosen[capacity]))
    return margin


def reference(case: Case, dtype: torch.dtype = torch.float32) -> StepRecord:
    """One process, written plainly: micro-batches of ``case.micro`` rows, each loss scaled by
    its share of the batch, then an SGD step."""
    model = _base_model(case, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    record = StepRecord()

    def measure(block: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        with torch.no_grad():
            probs = torch.softmax(block.router_logits(x.reshape(-1, x.shape[-1])), dim=-1)
        record.margin = min(record.margin,
                            _decision_margin(probs, block.expert_bias, case, x.shape[0]))

    for block in model.moe_blocks():
        block.register_forward_pre_hook(measure)
    for batch in _batches(case):
        optimizer.zero_grad(set_to_none=True)
        stats, total = MoEStepStats(_moe_layers(case)), 0.0
        step_balance = _balance(case)
        if case.options.aux_loss == "global":  # count the whole batch's routing first
            counts = MoEStepStats(_moe_layers(case))
            counting = MoEBalance(replace(case.options, aux_loss="switch"), step_balance.coefs)
            with torch.no_grad():
                for micro in batch.split(case.micro):
                    counts.add(model(micro, balance=counting).moe_stats)
            step_balance = step_balance.with_global_loads(counts.loads())
        for micro in batch.split(case.micro):
            out = model(micro, labels=micro, balance=step_balance)
            loss = (out.loss + out.aux_loss) * (micro.shape[0] / batch.shape[0])
            loss.backward()
            total += float(loss.detach())
            stats.add(out.moe_stats)
        record.losses.append(total)
        record.drops.append(stats.drop_rates())
        record.norms.append(float(torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters() if p.grad is not None])))
        record.grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None})
        optimizer.step()
    return record


def _pipeline_stages(case: Case, mesh: ParallelMesh) -> PipelineStages:
    on_rank = stages_of_rank(case.schedule, mesh.coords.pp, mesh.layout.pp, case.pipe.stages)
    return PipelineStages(_base_model(case), case.pipe, on_rank)


def sharded_run(case: Case, mesh: ParallelMesh) -> tuple[StepRecord, dict]:
    """The case under ``mesh``'s layout through the trainer's step functions: the rank's
    gradients (those it owns) and its placements."""
    layout = mesh.layout
    stages = _pipeline_stages(case, mesh) if layout.pp > 1 else None
    model = stages.model if stages is not None else _base_model(case)
    placements = parameter_placements(model, mesh)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    parallelize(model, mesh)
    dp = DataParallel(model, mesh, placements, numel,
                      counted_elsewhere=stages.tied_copies if stages else frozenset())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    rows = split_range(case.rows, layout.dp, mesh.coords.dp)
    micro_batches = (rows[1] - rows[0]) // case.micro
    strategy = (PipelineSteps(build_schedule(stages, mesh, micro_batches, case.micro,
                                             case.seq_len, case.schedule))
                if stages is not None
                else MicroBatchLoop(model, case.micro, contextlib.nullcontext,
                                    torch.device("cpu")))
    record = StepRecord()
    for batch in _batches(case):
        optimizer.zero_grad(set_to_none=True)
        stats = MoEStepStats(_moe_layers(case))
        loss, _ = accumulate_gradients(strategy, batch[rows[0]:rows[1]], _balance(case), dp,
                                       stats)
        record.losses.append(loss)
        record.norms.append(float(dp.grad_norm()))
        record.drops.append(stats.drop_rates())
        record.grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None})
        optimizer.step()
        dp.broadcast_parameters()
    return record, placements


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _tensor_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def _fp32_error(want: StepRecord, exact: StepRecord) -> float:
    """The largest relative distance of one process in fp32 from fp64, over every compared
    quantity."""
    errors = [_rel(w, e) for w, e in zip(want.losses + want.norms, exact.losses + exact.norms)]
    errors += [_tensor_rel(w[n], e[n]) for w, e in zip(want.grads, exact.grads) for n in w]
    return max(errors)


def compare(want: StepRecord, got: StepRecord, placements: dict,
            exact: StepRecord) -> tuple[list[str], int]:
    """Every difference beyond ``TOLERANCE`` as readable lines, and how many quantities were
    left out: those one fp32 process does not itself reproduce to ``UNDETERMINED`` (measured
    against ``exact``, the fp64 run), e.g. a gradient whose true value is about zero."""
    problems, undetermined = [], 0
    for step in range(STEPS):
        for what, got_v, want_v, exact_v in (
                ("loss", got.losses[step], want.losses[step], exact.losses[step]),
                ("grad norm", got.norms[step], want.norms[step], exact.norms[step])):
            if _rel(want_v, exact_v) >= UNDETERMINED:
                undetermined += 1
            elif _rel(got_v, want_v) >= TOLERANCE:
                problems.append(f"step {step + 1} {what} {got_v} != {want_v}")
        if any(abs(g - w) > 1e-7 for g, w in zip(got.drops[step], want.drops[step])):
            problems.append(f"step {step + 1} drop rates {got.drops[step]} != "
                            f"{want.drops[step]}")
        for name, grad in got.grads[step].items():
            # A tied LM head on the last pipeline stage is the embedding of the single model.
            key = name if name in want.grads[step] else "model.embed_tokens.weight"
            if key not in want.grads[step]:
                problems.append(f"step {step + 1} gradient of {name}: none in one process")
                continue
            # The floor of this rank's part: a part holding only small gradients (an expert
            # with few rows) can be ill-conditioned in a well-conditioned whole.
            expected = placements[name].take(want.grads[step][key])
            floor = _tensor_rel(expected, placements[name].take(exact.grads[step][key]))
            if floor >= UNDETERMINED:
                undetermined += 1
                continue
            err = _tensor_rel(grad, expected) if grad.shape == expected.shape else math.inf
            if err >= TOLERANCE:
                problems.append(f"step {step + 1} gradient of {name}: relative error {err:.2e} "
                                f"(one process in fp32 vs fp64: {floor:.2e})")
    return problems, undetermined


@dataclass
class FuzzReport:
    cases: int = 0
    runs: int = 0
    refused: list[str] = field(default_factory=list)   # layouts a case's model cannot take
    near_ties: list[str] = field(default_factory=list)  # differences a routing tie explains
    ill_conditioned: list[int] = field(default_factory=list)  # seeds: fp32 vs fp64 >= 1e-6
    undetermined: int = 0  # quantities (per rank and step) fp32 does not determine: left out
    failures: list[str] = field(default_factory=list)


def run_cases(cases: list[Case], world: int) -> FuzzReport:
    """Every case under every layout of ``world`` processes (called on every rank of an
    initialized process group). A run that raises (a collective timing out included)
    re-raises naming the case and the layout; differences are collected in the report."""
    meshes = [(layout, build_mesh(layout)) for layout in LAYOUTS[world]]
    report = FuzzReport()
    for case in cases:
        want, exact = reference(case), reference(case, torch.float64)
        report.cases += 1
        if _fp32_error(want, exact) >= UNDETERMINED:
            report.ill_conditioned.append(case.seed)
        for layout, mesh in meshes:
            try:
                layout.validate(config=case.config)
            except ConfigError as exc:  # e.g. ep = 2 with an odd number of experts
                report.refused.append(f"{layout.name}: {exc}")
                continue
            try:
                got, placements = sharded_run(case, mesh)
            except ConfigError as exc:  # a schedule that does not take this micro-batch count
                report.refused.append(f"{layout.name} {case.schedule}: {exc}")
                continue
            except Exception as exc:
                raise RuntimeError(f"{case.describe()} under {layout.name}: "
                                   f"{type(exc).__name__}: {exc}") from exc
            report.runs += 1
            problems, undetermined = compare(want, got, placements, exact)
            problems = [f"{case.describe()} under {layout.name}: {p}" for p in problems]
            report.undetermined += undetermined
            if want.margin < TIE:
                report.near_ties += [f"{p} (closest routing decision {want.margin:.1e})"
                                     for p in problems]
            else:
                report.failures += problems
            # Every gradient element has an owner somewhere, so the comparison covers the model.
            owned = torch.tensor([float(sum(g.numel() for g in got.grads[0].values()))])
            dist.all_reduce(owned, group=mesh.world.pg)
            if owned.item() < sum(g.numel() for g in want.grads[0].values()) - 0.5:
                report.failures.append(f"{case.describe()} under {layout.name}: the ranks "
                                       f"own {int(owned.item())} gradient elements")
    return report
