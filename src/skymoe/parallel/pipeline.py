"""Pipeline stages of a Skywork-MoE model, run by ``torch.distributed.pipelining``'s schedules.

``PipelineStages`` takes this rank's stages out of a full model as a part of it: the same
``SkyworkForCausalLM`` class holding only the stages' decoder layers (a ``PipelineLayout``
says which each stage holds; the first stage also holds the embedding, the last the final
norm, LM head and loss). A rank holds one stage under 1F1B and GPipe and several under the
interleaved and zero-bubble schedules. ``build_schedule`` wraps each stage for the schedule
(``StageChunk``, which runs the part's own layer loop) and returns the trainer's step strategy
(``PipelineSchedule``).

The MoE balance losses of a stage's layers never reach the last stage's loss: their sum is
attached to the stage's output by ``AttachAuxLoss`` (a copy forward; in backward it hands the
aux terms a gradient of one), so one pipeline backward yields the gradient of CE + aux exactly
as a single process does; the schedule divides every gradient by the micro-batch count.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

from ..errors import ConfigError
from ..model.loss import label_count
from ..model.moe import MoEBalance, MoEOutput, MoEStats, accumulate_stats
from ..model.transformer import SkyworkForCausalLM
from .comm import CollectiveOrder, CommGroup, all_reduce_
from .mesh import ParallelMesh
from .pipeline_layout import PipelineLayout
from .schedules import rank_of_stage, schedule_kind, stages_of_rank


class AttachAuxLoss(torch.autograd.Function):
    """A copy of ``hidden``; in backward, ``aux`` receives a gradient of one (Megatron's
    auxiliary-loss scaler), so a loss term computed mid-pipeline is differentiated along with
    the activations that carry it."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        # A copy, not ``hidden`` itself: returned inputs become views, which the zero-bubble
        # schedules' backward cannot detach in place.
        return hidden.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


class PipelineStages:
    """The pipeline stages one rank runs: ``model``, the part of the whole model holding the
    stages' layers (a ``SkyworkForCausalLM``, built by taking the modules of ``full`` it
    owns, as torchtitan builds the model and drops what a stage does not hold), and which
    layers each stage runs.

    The part takes the embedding if it runs the first stage, the final norm and LM head if it
    runs the last. Parameter names stay those of the whole model (``model.layers.12.…``), so
    placements, tensor/expert parallelism (``parallelize``), data parallelism and checkpoints
    work on the part unchanged.
    """

    def __init__(self, full: SkyworkForCausalLM, layout: PipelineLayout,
                 stages: int | Sequence[int]) -> None:
        layout.validate(full.config.num_hidden_layers)
        self.layout = layout
        self.stage_ids = sorted([stages] if isinstance(stages, int) else stages)
        self.num_stages = layout.stages
        # Whether this rank feeds the tokens in / computes the loss.
        self.is_first, self.is_last = 0 in self.stage_ids, layout.stages - 1 in self.stage_ids
        self.stage_layers = {s: list(layout.stage_layers(s)) for s in self.stage_ids}
        layer_ids = sorted(i for s in self.stage_ids for i in self.stage_layers[s])
        self.model = full.part(layer_ids, embedding=self.is_first, head=self.is_last)
        recomputed = {i for s in self.stage_ids for i in layout.recomputed_layers(s)}
        for layer in self.model.model.layers:
            layer.recompute = layer.layer_idx in recomputed
        if self.tied_copies:
            # The head and the embedding are in different stages (on another rank, or another
            # chunk of this one): the schedule handles each stage's parameters on its own
            # (scaling, zero-bubble weight gradients), so the head gets its own copy, kept
            # equal by summing the two gradients (``sync_tied_gradients``).
            self.model.lm_head = nn.Linear(full.config.hidden_size, full.config.vocab_size,
                                           bias=False, device=full.device, dtype=full.dtype)
            self.model.lm_head.weight = nn.Parameter(
                full.lm_head.weight.detach().clone(),
                requires_grad=full.lm_head.weight.requires_grad)  # frozen under LoRA
        # With tied embeddings on different ranks: the group of the two copies (set by
        # ``build_schedule``), over which their gradients are summed.
        self.tied_group: CommGroup | None = None

    @property
    def tied_copies(self) -> frozenset[str]:
        """Names of weights that copy another one: the LM head tied to the embedding, held
        apart because the first and the last stage are different stages (on another rank, or
        another chunk of this one)."""
        apart = not self.is_first or len(self.stage_ids) > 1
        tied = self.model.config.tie_word_embeddings and self.is_last and apart
        return frozenset({"lm_head.weight"}) if tied else frozenset()

    def sync_tied_gradients(self) -> None:
        """Sum the tied embedding / LM head gradient over its copies (the single-process
        gradient of the shared weight is the sum of both uses); nothing for a frozen one."""
        model = self.model
        held = ([model.model.embed_tokens.weight] if self.is_first else []) + (
            [model.lm_head.weight] if self.is_last else [])
        if not any(w.requires_grad for w in held):  # frozen (a LoRA base), or none here
            return
        if self.is_first and self.is_last:
            if self.tied_copies:  # both copies on this rank
                copies = (model.model.embed_tokens.weight, model.lm_head.weight)
                total = sum(w.grad if w.grad is not None else torch.zeros_like(w)
                            for w in copies)
                for w in copies:
                    w.grad = total.clone()
            return
        if self.tied_group is not None:
            weight = model.model.embed_tokens.weight if self.is_first else model.lm_head.weight
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            all_reduce_(weight.grad, self.tied_group)


class StepInputs:
    """What the stages of one pipeline step share beside the activations the schedule passes:
    the MoE balance settings going in, the MoE layers' aux values and statistics coming out
    (summed over the step's micro-batches). The schedule calls the stages with activations
    only, so ``PipelineSchedule.step`` sets this before running it."""

    def __init__(self) -> None:
        self.balance: MoEBalance | None = None
        self.ce_scale: float | None = None  # see PipelineSchedule.forward_backward
        self.aux = torch.zeros((), dtype=torch.float64)
        self.stats: dict[int, MoEStats] = {}

    def reset(self, balance: MoEBalance | None, ce_scale: float | None = None) -> None:
        self.balance, self.ce_scale = balance, ce_scale
        self.aux.zero_()
        self.stats = {}

    def record(self, moe: dict[int, MoEOutput]) -> None:
        self.aux += sum(float(out.aux.detach()) for out in moe.values())
        accumulate_stats(self.stats, {i: out.stats for i, out in moe.items()})


class StageChunk(nn.Module):
    """One stage of a rank's model part, as the schedule runs it: registers only that stage's
    modules (the schedule scales their gradients) and runs the part's embedding, layers and
    head for the stage. In training the stage's MoE aux terms are attached to its output
    (``AttachAuxLoss``) and their values and statistics recorded in ``inputs``."""

    def __init__(self, stages: PipelineStages, stage: int, inputs: StepInputs,
                 order: CollectiveOrder | None,
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        super().__init__()
        part = stages.model
        self.stage, self.layer_ids = stage, stages.stage_layers[stage]
        self.first, self.last = stage == 0, stage == stages.num_stages - 1
        self.layers = nn.ModuleList(part.model.layers[i] for i in self.layer_ids)
        if self.first:
            self.embed_tokens = part.model.embed_tokens
        if self.last:
            self.norm, self.lm_head = part.model.norm, part.lm_head
        # Not submodules: the part's parameters include the other stages'.
        object.__setattr__(self, "part", part)
        self.inputs, self.order, self.autocast = inputs, order, autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = self.part
        with self.autocast():
            if self.order is not None:
                self.order.begin(x.device)
            if self.first:
                x = part.embed(x)
            cos, sin = part.rotary.cos_sin(0, x.shape[1], x.device, x.dtype)
            x, moe = part.run_layers(x, cos, sin, None, 0, self.inputs.balance, self.layer_ids)
            if moe:
                self.inputs.record(moe)
                if torch.is_grad_enabled():  # one attachment for the stage's terms
                    x = AttachAuxLoss.apply(x, torch.stack([m.aux for m in moe.values()]).sum())
            if self.order is not None:  # what follows (the LM head) is on the loss's data path
                x = self.order.finish(x)
            if self.last:
                x = part.head(x)
        return x


def _example_io(stages: PipelineStages, stage: int, micro_batch_size: int, seq_len: int,
                logits_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta tensors with the shapes and dtypes of one micro-batch's input and output of
    ``stage``: token ids into the first stage, hidden states (the weights' dtype: the residual
    stream stays there under autocast) between stages, logits (this rank's vocabulary shard)
    out of the last."""
    part = stages.model
    # requires_grad tells the stage which gradients travel back between stages.
    hidden = torch.empty(micro_batch_size, seq_len, part.config.hidden_size,
                         dtype=part.dtype, device="meta", requires_grad=True)
    tokens = torch.empty(micro_batch_size, seq_len, dtype=torch.long, device="meta")
    if stage == stages.num_stages - 1:
        vocab = part.lm_head.weight.shape[0]
        out = torch.empty(micro_batch_size, seq_len, vocab, dtype=logits_dtype, device="meta",
                          requires_grad=True)
    else:
        out = hidden
    return (tokens if stage == 0 else hidden), out


def _tied_embedding_group(stages: PipelineStages, mesh: ParallelMesh,
                          schedule: str) -> CommGroup | None:
    """The group of this rank's tied embedding / LM head copies: for each (DP, TP) position,
    the pipeline rank holding stage 0 and the one holding the last stage. Every rank creates
    every group (``new_group`` is collective); None when both ends are on one rank."""
    layout = mesh.layout
    last = rank_of_stage(schedule, stages.num_stages - 1, layout.pp, stages.num_stages)
    if last == 0:
        return None
    mine = None
    for dp in range(layout.dp):
        for tp in range(layout.tp):
            ranks = [(pp * layout.dp + dp) * layout.tp + tp for pp in (0, last)]
            group = dist.new_group(ranks)
            if mesh.rank in ranks:
                mine = CommGroup(group, 2, ranks.index(mesh.rank), mesh.traffic, "tied",
                                 mesh.order)
    return mine


class PipelineSchedule:
    """One training step's forward and backward over a rank's pipeline stages, by
    ``torch.distributed.pipelining``'s schedule: the trainer's step strategy under pipeline
    parallelism (the other strategy runs micro-batches through the whole model in a loop)."""

    def __init__(self, stages: PipelineStages, schedule: PipelineScheduleSingle
                 | PipelineScheduleMulti, inputs: StepInputs, micro_batches: int,
                 micro_batch_size: int, pp: CommGroup, forward_only: bool = True) -> None:
        self.stages, self.schedule, self.inputs = stages, schedule, inputs
        self.micro_batches, self.micro_batch_size, self.pp = micro_batches, micro_batch_size, pp
        self.forward_only = forward_only  # whether the schedule can run forward-only passes

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                         balance: MoEBalance | None, ce_per_token: float
                         ) -> tuple[torch.Tensor, dict[int, MoEStats]]:
        """Fill ``.grad`` with the gradient of the data-parallel rank's rows (run as the
        schedule's equal micro-batches; the rank holding the first stage feeds the tokens,
        the one holding the last computes the loss, each micro-batch's mean CE weighed by
        its label tokens times ``ce_per_token``). Returns the (loss, CE loss) of the rank's
        rows and the MoE statistics of every MoE layer, each summed over the pipeline ranks
        (so every rank of the pipeline sees the whole model's)."""
        stages, inputs = self.stages, self.inputs
        # The schedule divides the gradients by the micro-batch count: scale it back in.
        inputs.reset(balance, ce_per_token * self.micro_batches)
        micro_losses: list[torch.Tensor] = []
        self.schedule.step(*((input_ids,) if stages.is_first else ()),
                           target=labels if stages.is_last else None,
                           losses=micro_losses if stages.is_last else None,
                           return_outputs=False)
        stages.sync_tied_gradients()
        ce = sum(float(loss.detach()) for loss in micro_losses) / self.micro_batches
        sums = torch.tensor([ce + float(inputs.aux) / self.micro_batches, ce],
                            dtype=torch.float64)
        return all_reduce_(sums, self.pp), self._whole_model_stats()

    def expert_loads(self, input_ids: torch.Tensor, balance: MoEBalance
                     ) -> dict[int, torch.Tensor]:
        """Every MoE layer's expert load over the rank's rows: the schedule's forward-only
        pass in training mode, statistics summed over the pipeline ranks."""
        if not self.forward_only:
            raise ConfigError("the global-batch balance loss needs a forward-only pipeline "
                              "pass, which this schedule cannot run; use another "
                              "parallel.pp_schedule or moe.aux_loss")
        stages = self.stages
        self.inputs.reset(balance)
        self.schedule.eval(*((input_ids,) if stages.is_first else ()),
                           target=input_ids if stages.is_last else None,
                           losses=[] if stages.is_last else None, return_outputs=False)
        return {i: s.load for i, s in self._whole_model_stats().items()}

    @property
    def eval_rows(self) -> int:
        """Rows per evaluation call: a whole schedule step (its shapes are fixed)."""
        return self.micro_batches * self.micro_batch_size

    def loss_sums(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(sum of CE over label tokens, label tokens) of a batch through the pipeline,
        forward only; zeros except on the last stage's ranks, for a batch of another size,
        and for a schedule that cannot run forward-only passes."""
        stages = self.stages
        if input_ids.shape[0] != self.eval_rows or not self.forward_only:
            return torch.zeros(2, dtype=torch.float64)
        self.inputs.reset(None)
        losses: list[torch.Tensor] = []
        self.schedule.eval(*((input_ids,) if stages.is_first else ()),
                           target=labels if stages.is_last else None,
                           losses=losses if stages.is_last else None, return_outputs=False)
        if not stages.is_last:
            return torch.zeros(2, dtype=torch.float64)
        counts = [label_count(m) for m in labels.split(self.micro_batch_size)]
        total = sum(float(loss) * n for loss, n in zip(losses, counts))
        return torch.tensor([total, sum(counts)], dtype=torch.float64)

    def _whole_model_stats(self) -> dict[int, MoEStats]:
        """This rank's statistics, zeros for MoE layers held elsewhere, summed over the
        pipeline ranks layer by layer (every rank reduces the same tensors in one order)."""
        part = self.stages.model
        config = part.config
        stats = {i: self.inputs.stats.get(i) or MoEStats.zeros(config.num_experts, part.device)
                 for i in range(config.num_hidden_layers) if config.is_moe_layer(i)}
        for layer_stats in stats.values():
            for t in layer_stats.tensors():
                all_reduce_(t, self.pp)
        return stats


def build_schedule(stages: PipelineStages, mesh: ParallelMesh, micro_batches: int,
                   micro_batch_size: int, seq_len: int, schedule: str = "1f1b",
                   logits_dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu",
                   autocast: Callable[[], contextlib.AbstractContextManager]
                   = contextlib.nullcontext) -> PipelineSchedule:
    """``torch.distributed.pipelining``'s ``schedule`` over this rank's (already
    parallelized) stages for micro-batches of ``micro_batch_size`` x ``seq_len`` tokens. Each
    stage runs under ``autocast`` (bf16 in mixed-precision training); the loss is the model's
    (vocabulary-parallel under TP), computed under it too; ``logits_dtype`` is what the last
    stage's forward returns (the autocast dtype in mixed precision; default the weights'
    dtype).

    Stage inputs and outputs are declared up front, so no metadata-inference forward runs on
    placeholder data (it would route garbage through the MoE layers and count it)."""
    kind = schedule_kind(schedule)
    expected = stages_of_rank(schedule, mesh.coords.pp, mesh.layout.pp, stages.num_stages)
    if stages.stage_ids != expected:
        raise ConfigError(f"the {schedule} schedule runs stages {expected} on pipeline rank "
                          f"{mesh.coords.pp}, but this rank's model holds {stages.stage_ids}")
    part = stages.model
    if part.config.tie_word_embeddings and mesh.world.active:
        stages.tied_group = _tied_embedding_group(stages, mesh, schedule)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast():
            loss = part.loss_function(logits, labels)
        # Training: the micro-batch's mean CE weighed by its label tokens (forward_backward).
        return loss * (label_count(labels) * inputs.ce_scale) if inputs.ce_scale else loss

    logits_dtype = logits_dtype or part.dtype
    inputs = StepInputs()
    order = mesh.order if mesh.world.active else None
    torch_stages = []
    for s in stages.stage_ids:
        chunk = StageChunk(stages, s, inputs, order, autocast)
        example_in, example_out = _example_io(stages, s, micro_batch_size, seq_len,
                                              logits_dtype)
        torch_stages.append(PipelineStage(chunk, s, stages.num_stages, torch.device(device),
                                          input_args=example_in, output_args=example_out,
                                          group=mesh.pp.pg))
    try:  # the schedule checks the micro-batch count against its stages
        runner = kind.torch_class()(torch_stages[0] if kind.placement == "single"
                                    else torch_stages,
                                    n_microbatches=micro_batches, loss_fn=loss_fn)
    except ValueError as exc:
        raise ConfigError(f"the {schedule} schedule with {micro_batches} micro-batches per "
                          f"step: {' '.join(str(exc).split())} (micro-batches = a data-parallel "
                          "rank's rows / train.micro_batch_size)") from None
    return PipelineSchedule(stages, runner, inputs, micro_batches, micro_batch_size, mesh.pp,
                            kind.forward_only)
