"""Pipeline stages of a Skywork-MoE model, run by ``torch.distributed.pipelining``'s schedules.

``PipelineStageModel`` takes this rank's stages out of a full model (a ``PipelineLayout`` says
which decoder layers each stage holds; the first stage also holds the embedding, the last the
final norm, LM head and loss). A rank holds one stage under 1F1B and GPipe and several under
the interleaved and zero-bubble schedules. Parameter names stay those of the full model
(``model.layers.12.…``), so placements, tensor/expert parallelism (``parallelize``), data
parallelism and checkpoints work on a rank's stages unchanged.

The MoE balance losses of a stage's layers never reach the last stage's loss: their sum is
attached to the stage's output by ``AttachAuxLoss`` (a copy forward; in backward it hands the
aux terms a gradient of one), so one pipeline backward yields the gradient of CE + aux exactly
as a single process does; the schedule divides every gradient by the micro-batch count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..model.moe import MoEBlock, zero_moe_stats
from ..model.transformer import SkyworkForCausalLM
from .comm import CollectiveOrder, CommGroup, all_reduce_
from .mesh import ParallelMesh
from .pipeline_layout import PipelineLayout
from .schedules import SCHEDULES, rank_of_stage, stages_of_rank


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


class PipelineStageModel(nn.Module):
    """The pipeline stages one rank runs, taken from a full ``SkyworkForCausalLM`` (whose
    modules it takes over).

    ``run_stage(s, x)`` maps token ids (stage 0) or hidden states [B, T, H] to hidden states,
    or to logits on the last stage; ``chunks()`` gives one module per stage for the schedule.
    In training the aux terms of a stage's MoE layers are attached to its output and their
    statistics summed into ``step_stats`` / ``step_aux`` for the step.
    """

    def __init__(self, model: SkyworkForCausalLM, layout: PipelineLayout,
                 stages: int | Sequence[int]) -> None:
        super().__init__()
        layout.validate(model.config.num_hidden_layers)
        self.config = model.config
        self.stage_ids = sorted([stages] if isinstance(stages, int) else stages)
        self.num_stages = layout.stages
        # Whether this rank feeds the tokens in / computes the loss.
        self.is_first, self.is_last = 0 in self.stage_ids, layout.stages - 1 in self.stage_ids
        self.stage_layers = {s: list(layout.stage_layers(s)) for s in self.stage_ids}
        self.layer_ids = sorted(i for s in self.stage_ids for i in self.stage_layers[s])
        self.recompute_ids = {i for s in self.stage_ids for i in layout.recomputed_layers(s)}
        stack = nn.Module()  # keeps the HF prefix ``model.`` of every parameter name
        if self.is_first:
            stack.embed_tokens = model.model.embed_tokens
        stack.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in self.layer_ids})
        if self.is_last:
            stack.norm = model.model.norm
            self.lm_head = model.lm_head
            if self.tied_copies and self.is_first:
                # Both ends in different chunks of this rank: the schedule handles each
                # chunk's parameters on its own (scaling, zero-bubble weight gradients), so the
                # head gets its own copy, kept equal by summing the two gradients.
                self.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        self.model = stack
        self.rotary = model.rotary
        self.loss_function = model.loss_function
        # Entered around each stage's forward (bf16 autocast in training); the schedule calls it.
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.step_aux = torch.zeros((), dtype=torch.float64)
        self.step_stats: dict[int, dict[str, torch.Tensor]] = {}
        # With tied embeddings on different ranks: the group of the two copies (set by
        # ``build_schedule``), over which their gradients are summed.
        self.tied_group: CommGroup | None = None
        # Chains the backward collectives of each stage forward (set by ``parallelize``).
        self.collective_order: CollectiveOrder | None = None

    @property
    def tied_copies(self) -> frozenset[str]:
        """Names of weights that copy another one: the LM head tied to the embedding, held
        apart because the first and the last stage are different stages (on another rank, or
        another chunk of this one)."""
        apart = not self.is_first or len(self.stage_ids) > 1
        tied = self.config.tie_word_embeddings and self.is_last and apart
        return frozenset({"lm_head.weight"}) if tied else frozenset()

    def sync_tied_gradients(self) -> None:
        """Sum the tied embedding / LM head gradient over its copies (the single-process
        gradient of the shared weight is the sum of both uses)."""
        if self.is_first and self.is_last:
            if self.tied_copies:  # both copies on this rank
                copies = (self.model.embed_tokens.weight, self.lm_head.weight)
                total = sum(w.grad if w.grad is not None else torch.zeros_like(w)
                            for w in copies)
                for w in copies:
                    w.grad = total.clone()
            return
        if self.tied_group is not None:
            weight = self.model.embed_tokens.weight if self.is_first else self.lm_head.weight
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            all_reduce_(weight.grad, self.tied_group)

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.model.layers.values())

    def moe_blocks(self) -> dict[int, MoEBlock]:
        """This rank's MoE blocks by global layer index."""
        return {i: layer.block_sparse_moe for i, layer in zip(self.layer_ids, self.layers)
                if hasattr(layer, "block_sparse_moe")}

    def set_aux_coefs(self, coefs: list[float]) -> None:
        """Balance-loss coefficients of every MoE layer of the whole model, in layer order
        (as ``SkyworkForCausalLM.set_aux_coefs``); this rank takes its own."""
        moe_layers = [i for i in range(self.config.num_hidden_layers)
                      if self.config.is_moe_layer(i)]
        if len(coefs) != len(moe_layers):
            raise ValueError(f"got {len(coefs)} coefficients for {len(moe_layers)} MoE layers")
        by_layer = dict(zip(moe_layers, coefs))
        for i, block in self.moe_blocks().items():
            block.aux_coef = float(by_layer[i])

    def compile_layers(self, **compile_kwargs) -> "PipelineStageModel":
        """``torch.compile`` each of the rank's decoder layers in place (see
        ``SkyworkForCausalLM.compile_layers``)."""
        for layer in self.layers:
            layer.compile(**compile_kwargs)
        return self

    def chunks(self) -> list["StageChunk"]:
        """One module per stage of this rank, in stage order, for ``PipelineStage``."""
        return [StageChunk(self, s) for s in self.stage_ids]

    def run_stage(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``stage``'s forward of one micro-batch."""
        order = self.collective_order
        with self.autocast():
            if order is not None:
                order.begin(x.device)
            if stage == 0:
                x = self.model.embed_tokens(x)
            cos, sin = self.rotary.cos_sin(0, x.shape[1], x.device, x.dtype)
            recompute = self.training and torch.is_grad_enabled()
            aux_terms = []
            for i in self.stage_layers[stage]:
                layer = self.model.layers[str(i)]
                if recompute and i in self.recompute_ids:
                    x = checkpoint(layer, x, cos, sin, None, 0, use_reentrant=False)
                else:
                    x = layer(x, cos, sin, None, 0)
                aux_terms += self._take_moe_outputs(i, layer)
            if aux_terms and torch.is_grad_enabled():  # one attachment for the stage's terms
                x = AttachAuxLoss.apply(x, torch.stack(aux_terms).sum())
            if order is not None:  # what follows (the LM head) is on the loss's data path
                x = order.finish(x)
            if stage == self.num_stages - 1:
                x = self.lm_head(self.model.norm(x))
        return x

    def _take_moe_outputs(self, index: int, layer: nn.Module) -> list[torch.Tensor]:
        """The aux term a training forward of ``layer`` left (empty for dense layers and in
        evaluation); its statistics are added to the step's sums."""
        block = getattr(layer, "block_sparse_moe", None)
        if block is None or block.last_aux is None:
            return []
        aux, stats = block.last_aux, block.last_stats
        block.last_aux = block.last_stats = None
        self.step_aux += float(aux.detach())
        # Keys in one fixed order on every rank: the sums are all-reduced key by key.
        sums = self.step_stats.setdefault(index, zero_moe_stats(self.config.num_experts))
        for k, v in stats.items():
            sums[k] += v.to(sums[k].device)
        return [aux]

    def reset_step(self) -> None:
        self.step_aux.zero_()
        self.step_stats.clear()

    def all_layer_stats(self, moe_layers: list[int]) -> list[dict[str, torch.Tensor]]:
        """This rank's summed statistics for every MoE layer of the model, zeros for layers
        on other ranks (so summing over the pipeline group gives every layer's)."""
        return [self.step_stats.get(i) or zero_moe_stats(self.config.num_experts)
                for i in moe_layers]


class StageChunk(nn.Module):
    """One stage of a ``PipelineStageModel``: registers only that stage's modules (the
    schedule scales their gradients) and runs the owner's ``run_stage``."""

    def __init__(self, owner: PipelineStageModel, stage: int) -> None:
        super().__init__()
        self.stage = stage
        self.layers = nn.ModuleList(owner.model.layers[str(i)] for i in owner.stage_layers[stage])
        if stage == 0:
            self.embed_tokens = owner.model.embed_tokens
        if stage == owner.num_stages - 1:
            self.norm, self.lm_head = owner.model.norm, owner.lm_head
        # Not a submodule: the owner's parameters include the other stages'.
        object.__setattr__(self, "owner", owner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner.run_stage(self.stage, x)


def _example_io(owner: PipelineStageModel, stage: int, micro_batch_size: int, seq_len: int,
                logits_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta tensors with the shapes and dtypes of one micro-batch's input and output of
    ``stage``: token ids into the first stage, hidden states (the weights' dtype: the residual
    stream stays there under autocast) between stages, logits (this rank's vocabulary shard)
    out of the last."""
    hidden_dtype = next(owner.parameters()).dtype
    # requires_grad tells the stage which gradients travel back between stages.
    hidden = torch.empty(micro_batch_size, seq_len, owner.config.hidden_size,
                         dtype=hidden_dtype, device="meta", requires_grad=True)
    tokens = torch.empty(micro_batch_size, seq_len, dtype=torch.long, device="meta")
    if stage == owner.num_stages - 1:
        vocab = owner.lm_head.weight.shape[0]
        out = torch.empty(micro_batch_size, seq_len, vocab, dtype=logits_dtype, device="meta",
                          requires_grad=True)
    else:
        out = hidden
    return (tokens if stage == 0 else hidden), out


def _tied_embedding_group(stage_model: PipelineStageModel, mesh: ParallelMesh,
                          schedule: str) -> CommGroup | None:
    """The group of this rank's tied embedding / LM head copies: for each (DP, TP) position,
    the pipeline rank holding stage 0 and the one holding the last stage. Every rank creates
    every group (``new_group`` is collective); None when both ends are on one rank."""
    layout = mesh.layout
    last = rank_of_stage(schedule, stage_model.num_stages - 1, layout.pp, stage_model.num_stages)
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


def build_schedule(stage_model: PipelineStageModel, mesh: ParallelMesh, micro_batches: int,
                   micro_batch_size: int, seq_len: int, schedule: str = "1f1b",
                   logits_dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu"
                   ) -> PipelineScheduleSingle | PipelineScheduleMulti:
    """``torch.distributed.pipelining``'s ``schedule`` over this rank's (already
    parallelized) stages for micro-batches of ``micro_batch_size`` x ``seq_len`` tokens. The
    loss is the model's (vocabulary-parallel under TP), computed under the stages' autocast;
    ``logits_dtype`` is what the last stage's forward returns (the autocast dtype in mixed
    precision; default the weights' dtype).

    Stage inputs and outputs are declared up front, so no metadata-inference forward runs on
    placeholder data (it would route garbage through the MoE layers and count it)."""
    expected = stages_of_rank(schedule, mesh.coords.pp, mesh.layout.pp, stage_model.num_stages)
    if stage_model.stage_ids != expected:
        raise ConfigError(f"the {schedule} schedule runs stages {expected} on pipeline rank "
                          f"{mesh.coords.pp}, but this rank's model holds {stage_model.stage_ids}")
    if stage_model.config.tie_word_embeddings and mesh.world.active:
        stage_model.tied_group = _tied_embedding_group(stage_model, mesh, schedule)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with stage_model.autocast():
            return stage_model.loss_function(logits, labels)

    logits_dtype = logits_dtype or next(stage_model.parameters()).dtype
    stages = []
    for chunk in stage_model.chunks():
        example_in, example_out = _example_io(stage_model, chunk.stage, micro_batch_size,
                                              seq_len, logits_dtype)
        stages.append(PipelineStage(chunk, chunk.stage, stage_model.num_stages,
                                    torch.device(device), input_args=example_in,
                                    output_args=example_out, group=mesh.pp.pg))
    kind = SCHEDULES[schedule]
    try:  # the schedule checks the micro-batch count against its stages
        return kind.torch_class()(stages[0] if kind.placement == "single" else stages,
                        n_microbatches=micro_batches, loss_fn=loss_fn)
    except ValueError as exc:
        raise ConfigError(f"the {schedule} schedule with {micro_batches} micro-batches per "
                          f"step: {' '.join(str(exc).split())} (micro-batches = a data-parallel "
                          "rank's rows / train.micro_batch_size)") from None
