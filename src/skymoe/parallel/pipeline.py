"""Pipeline stages of a Skywork-MoE model, run by ``torch.distributed.pipelining``'s schedules.

``PipelineStageModel`` takes this rank's stage out of a full model (a ``PipelineLayout`` says
which decoder layers; the first stage also holds the embedding, the last the final norm, LM
head and loss). Parameter names stay those of the full model (``model.layers.12.…``), so
placements, tensor/expert parallelism (``parallelize``), data parallelism and checkpoints work
on a stage unchanged.

The MoE balance losses of a stage's layers never reach the last stage's loss: each is attached
to the stage's activations by ``AttachAuxLoss`` (identity forward; in backward it hands the aux
term a gradient of one), so one pipeline backward yields the gradient of CE + aux exactly as a
single process does; the schedule divides every gradient by the micro-batch count.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.pipelining.schedules import PipelineScheduleSingle
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..model.moe import MoEBlock, zero_moe_stats
from ..model.transformer import SkyworkForCausalLM
from .mesh import ParallelMesh
from .pipeline_layout import PipelineLayout

SCHEDULES: dict[str, type[PipelineScheduleSingle]] = {"1f1b": Schedule1F1B,
                                                      "gpipe": ScheduleGPipe}


class AttachAuxLoss(torch.autograd.Function):
    """``hidden`` unchanged; in backward, ``aux`` receives a gradient of one (Megatron's
    auxiliary-loss scaler), so a loss term computed mid-pipeline is differentiated along with
    the activations that carry it."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return hidden

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


class PipelineStageModel(nn.Module):
    """One pipeline stage of a full ``SkyworkForCausalLM`` (whose modules it takes over).

    ``forward`` maps token ids (first stage) or hidden states [B, T, H] to hidden states, or to
    logits on the last stage. In training each MoE layer's aux term is attached to the
    activations and its statistics summed into ``step_stats`` / ``step_aux`` for the step.
    """

    def __init__(self, model: SkyworkForCausalLM, layout: PipelineLayout, stage: int) -> None:
        super().__init__()
        layout.validate(model.config.num_hidden_layers)
        self.config = model.config
        self.stage, self.num_stages = stage, layout.stages
        self.is_first, self.is_last = stage == 0, stage == layout.stages - 1
        self.layer_ids = list(layout.stage_layers(stage))
        self.recompute_ids = set(layout.recomputed_layers(stage))
        stack = nn.Module()  # keeps the HF prefix ``model.`` of every parameter name
        if self.is_first:
            stack.embed_tokens = model.model.embed_tokens
        stack.layers = nn.ModuleDict({str(i): model.model.layers[i] for i in self.layer_ids})
        if self.is_last:
            stack.norm = model.model.norm
            self.lm_head = model.lm_head
        self.model = stack
        self.rotary = model.rotary
        self.loss_function = model.loss_function
        # Entered around the forward (bf16 autocast in training); the schedule calls forward.
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.step_aux = torch.zeros((), dtype=torch.float64)
        self.step_stats: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def layers(self) -> list[nn.Module]:
        return list(self.model.layers.values())

    def moe_blocks(self) -> dict[int, MoEBlock]:
        """This stage's MoE blocks by global layer index."""
        return {i: layer.block_sparse_moe for i, layer in zip(self.layer_ids, self.layers)
                if hasattr(layer, "block_sparse_moe")}

    def set_aux_coefs(self, coefs: list[float]) -> None:
        """Balance-loss coefficients of every MoE layer of the whole model, in layer order
        (as ``SkyworkForCausalLM.set_aux_coefs``); this stage takes its own."""
        moe_layers = [i for i in range(self.config.num_hidden_layers)
                      if self.config.is_moe_layer(i)]
        if len(coefs) != len(moe_layers):
            raise ValueError(f"got {len(coefs)} coefficients for {len(moe_layers)} MoE layers")
        by_layer = dict(zip(moe_layers, coefs))
        for i, block in self.moe_blocks().items():
            block.aux_coef = float(by_layer[i])

    def compile_layers(self, **compile_kwargs) -> "PipelineStageModel":
        """``torch.compile`` each of the stage's decoder layers in place (see
        ``SkyworkForCausalLM.compile_layers``)."""
        for layer in self.layers:
            layer.compile(**compile_kwargs)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            if self.is_first:
                x = self.model.embed_tokens(x)
            cos, sin = self.rotary.cos_sin(0, x.shape[1], x.device, x.dtype)
            recompute = self.training and torch.is_grad_enabled()
            for i, layer in zip(self.layer_ids, self.layers):
                if recompute and i in self.recompute_ids:
                    x = checkpoint(layer, x, cos, sin, None, 0, use_reentrant=False)
                else:
                    x = layer(x, cos, sin, None, 0)
                x = self._carry_aux(i, layer, x)
            if self.is_last:
                x = self.lm_head(self.model.norm(x))
        return x

    def _carry_aux(self, index: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        block = getattr(layer, "block_sparse_moe", None)
        if block is None or block.last_aux is None:
            return x
        aux, stats = block.last_aux, block.last_stats
        block.last_aux = block.last_stats = None
        self.step_aux += float(aux.detach())
        # Keys in one fixed order on every stage: the sums are all-reduced key by key.
        sums = self.step_stats.setdefault(index, zero_moe_stats(self.config.num_experts))
        for k, v in stats.items():
            sums[k] += v.to(sums[k].device)
        return AttachAuxLoss.apply(x, aux) if torch.is_grad_enabled() else x

    def reset_step(self) -> None:
        self.step_aux.zero_()
        self.step_stats.clear()

    def all_layer_stats(self, moe_layers: list[int]) -> list[dict[str, torch.Tensor]]:
        """This stage's summed statistics for every MoE layer of the model, zeros for layers
        on other stages (so summing over the pipeline group gives every layer's)."""
        return [self.step_stats.get(i) or zero_moe_stats(self.config.num_experts)
                for i in moe_layers]


def pipeline_layout_for(layout_spec: PipelineLayout | None, num_layers: int,
                        stages: int) -> PipelineLayout:
    """The given layout (checked against the model) or the uniform split."""
    if layout_spec is None:
        return PipelineLayout.uniform(num_layers, stages)
    return layout_spec.validate(num_layers, stages)


def _example_io(stage_model: PipelineStageModel, micro_batch_size: int, seq_len: int,
                logits_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta tensors with the shapes and dtypes of one micro-batch's stage input and output:
    token ids into the first stage, hidden states (the weights' dtype: the residual stream
    stays there under autocast) between stages, logits (this rank's vocabulary shard) out of
    the last."""
    hidden_dtype = next(stage_model.parameters()).dtype
    # requires_grad tells the stage which gradients travel back between stages.
    hidden = torch.empty(micro_batch_size, seq_len, stage_model.config.hidden_size,
                         dtype=hidden_dtype, device="meta", requires_grad=True)
    tokens = torch.empty(micro_batch_size, seq_len, dtype=torch.long, device="meta")
    if stage_model.is_last:
        vocab = stage_model.lm_head.weight.shape[0]
        out = torch.empty(micro_batch_size, seq_len, vocab, dtype=logits_dtype, device="meta",
                          requires_grad=True)
    else:
        out = hidden
    return (tokens if stage_model.is_first else hidden), out


def build_schedule(stage_model: PipelineStageModel, mesh: ParallelMesh, micro_batches: int,
                   micro_batch_size: int, seq_len: int, schedule: str = "1f1b",
                   logits_dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu") -> PipelineScheduleSingle:
    """``torch.distributed.pipelining``'s ``schedule`` over this rank's (already
    parallelized) stage for micro-batches of ``micro_batch_size`` x ``seq_len`` tokens. The
    loss is the model's (vocabulary-parallel under TP), computed under the stage's autocast;
    ``logits_dtype`` is what the last stage's forward returns (the autocast dtype in mixed
    precision; default the weights' dtype).

    Stage inputs and outputs are declared up front, so no metadata-inference forward runs on
    placeholder data (it would route garbage through the MoE layers and count it)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule {schedule!r}; use one of "
                          f"{sorted(SCHEDULES)}")
    if schedule == "1f1b" and micro_batches < stage_model.num_stages:
        raise ConfigError(f"the 1f1b schedule needs at least as many micro-batches per step "
                          f"({micro_batches}) as pipeline stages ({stage_model.num_stages}); "
                          "lower train.micro_batch_size or raise train.batch_size")

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with stage_model.autocast():
            return stage_model.loss_function(logits, labels)

    example_in, example_out = _example_io(
        stage_model, micro_batch_size, seq_len,
        logits_dtype or next(stage_model.parameters()).dtype)
    stage = PipelineStage(stage_model, mesh.coords.pp, stage_model.num_stages,
                          torch.device(device), input_args=example_in, output_args=example_out,
                          group=mesh.pp.pg)
    return SCHEDULES[schedule](stage, n_microbatches=micro_batches, loss_fn=loss_fn)
