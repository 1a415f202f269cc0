"""The trainer: data -> tokenizer -> Skywork-MoE model -> AdamW steps with Skywork's balancing,
metrics, validation, checkpoints that lose nothing, and a clean stop on SIGINT/SIGTERM.

One optimizer step = ``batch_size`` packed sequences in ``batch_size / micro_batch_size``
micro-batches. Each micro-batch's loss (CE mean + the MoE blocks' aux terms) is scaled by its
share of the batch's sequences, so the step's gradient is that of the whole batch however it is
split (routing groups are fixed-size, so capacity and balance losses do not depend on the split
either). The adaptive aux coefficients are updated once per step from that step's drop rates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

from ..checkpoint import load_model
from ..checkpoint.dcp import load_pieces
from ..checkpoint.chat_template import ChatTemplate
from ..config import SkyworkMoeConfig, resolve_config
from ..errors import ConfigError, TrainingError
from ..infer.generate import SamplingParams, generate
from ..kernels import load_kernels
from ..model.balance import AuxCoefController, ExpertBiasController
from ..model.moe import MoEBalance, MoETrainingOptions
from ..model.transformer import SkyworkForCausalLM, build_model
from ..parallel import full_state, sharded_state
from ..parallel.apply import parallelize, parameter_placements
from ..parallel.comm import all_reduce_
from ..parallel.data_parallel import DataParallel
from ..parallel.health import guard_collectives
from ..parallel.layout import split_range
from ..parallel.mesh import build_mesh, init_distributed
from ..parallel.pipeline import PipelineStages, build_schedule
from ..parallel.schedules import SCHEDULES, stages_of_rank
from ..runtime import keep_freed_memory
from . import finetune, run_state
from .background_save import BackgroundSaver
from .batch import Batch
from . import step as step_ops
from .config import TrainConfig
from .metrics import MetricsLog, MoEStepStats
from .run_data import run_data

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``lr_decay_steps`` (default ``steps``), constant after; or ``lr`` throughout with the
    ``"constant"`` schedule. ``step`` counts from 0."""
    t = cfg.train
    if t.schedule == "constant":
        return t.lr
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    decay = max((t.lr_decay_steps or t.steps) - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / decay, 1.0)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    loss: float        # CE + aux terms, averaged over the batch
    ce_loss: float
    grad_norm: float


@dataclass
class RunSummary:
    steps: int
    final_loss: float | None
    val_loss: float | None
    checkpoint: Path | None
    run_dir: Path
    interrupted: bool = False


class Trainer:
    """Sets up a run from a ``TrainConfig`` (fresh, or resumed from the run's latest
    checkpoint), then ``run()`` trains to ``train.steps``."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> None:
        cfg.validate()
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.device = torch.device(cfg.train.device)
        layout = cfg.layout()
        _, world_size = init_distributed(cfg.parallel.timeout_s, self.device.type)
        layout.validate(world_size=world_size)
        if cfg.train.batch_size % layout.dp:
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of "
                              f"parallel.dp ({layout.dp}): every replica takes an equal share")
        self.mesh = build_mesh(layout, self.device.type)
        self.is_main = self.mesh.is_main
        self.quiet = quiet or not self.is_main  # one process reports
        self.local_rows = split_range(cfg.train.batch_size, layout.dp, self.mesh.coords.dp)
        if cfg.train.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        self._check_run_dir(resume)
        if cfg.model.init_from:
            cfg.model.init_from = str(finetune.starting_checkpoint(Path(cfg.model.init_from)))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.train.seed)
        run = run_data(cfg, self.run_dir, self.is_main, self._barrier, self._log)
        self.tokenizer, self.tokenizer_dir = run.tokenizer, run.tokenizer_dir
        self.loader, self.val_rows = run.loader, run.val_rows
        self._log(run.summary)
        self.model = self._build_model()
        layout.validate(config=self.model.config)
        config = self.model.config
        self.moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
        m = cfg.moe
        self.controller = AuxCoefController(len(self.moe_layers), m.aux_coef, m.adaptive, m.xi,
                                            m.alpha_max, m.beta)
        self.moe_options = MoETrainingOptions(
            capacity_factor=m.capacity_factor, drop_policy=m.drop_policy, aux_loss=m.aux_loss,
            z_loss_coef=m.z_loss_coef, routing_group_size=m.routing_group_size)
        self.step = 0
        self.last_checkpoint: Path | None = None
        # A LoRA run's checkpoints hold only what trains (adapters, a trained router, buffers
        # such as routing biases) and the optimizer's states of those: the frozen base is
        # model.init_from, loaded again on resume.
        self.sharded = cfg.lora.enabled or cfg.train.checkpoint_format == "sharded" or (
            cfg.train.checkpoint_format == "auto"
            and (self.mesh.world.active or cfg.train.async_checkpoint))
        self._saver = BackgroundSaver() if cfg.train.async_checkpoint else None
        self._failed = False
        # Checkpoint collectives on a group of their own (gloo: DCP plans on CPU), apart from
        # the training traffic, and from its thread when saving in the background.
        self.checkpoint_group = (torch.distributed.new_group(
            backend="gloo", timeout=timedelta(seconds=cfg.parallel.timeout_s))
            if self.mesh.world.active else None)
        self._resumed_state: dict | None = None
        if resume:
            self._resume_model()
        # From the whole model (loaded or resumed), before a pipeline keeps this rank's part.
        self.bias_controller = (ExpertBiasController(
            {i: b.expert_bias for i, b in self.model.moe_blocks_by_layer().items()},
            m.bias_update_rate) if m.expert_bias else None)
        self.full_groups = _param_groups(
            full_state.full_shapes(self.model.config).items())
        stages = self._pipeline_stages() if layout.pp > 1 else None
        if stages is not None:  # from here on ``model`` is this rank's part of the model
            self.model = stages.model
        # Shard the model (or part) for this rank (a no-op for one process).
        self.placements = parameter_placements(self.model, self.mesh)
        numel = {n: p.numel() for n, p in self.model.named_parameters()}
        parallelize(self.model, self.mesh, cfg.parallel.a2a_chunks)
        if resume and run_state.is_sharded(self.last_checkpoint):  # this rank's pieces only
            load_pieces(self._model_pieces(),
                        self.last_checkpoint / run_state.SHARDED, self.checkpoint_group)
        self.steps: step_ops.StepStrategy = (
            self._pipeline_schedule(stages) if stages is not None else step_ops.MicroBatchLoop(
                self.model, cfg.train.micro_batch_size, self._autocast, self.device))
        self.dp = DataParallel(self.model, self.mesh, self.placements, numel, cfg.parallel.zero,
                               stages.tied_copies if stages is not None else frozenset())
        self.optimizer = self._build_optimizer()
        if resume:
            self._resume_optimizer()
        if cfg.train.compile:
            self.model.compile_layers()
        if self.is_main:
            cfg.save(self.run_dir / "config.toml")
        self.stats = MoEStepStats(self.moe_layers)
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------------------- set-up
    def _check_run_dir(self, resume: bool) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise TrainingError(f"{self.run_dir}: is a file, not a run directory; set run.dir "
                                "(--run-dir) to a directory")
        has_checkpoints = bool(run_state.list_checkpoints(self.run_dir))
        if resume and not has_checkpoints:
            raise TrainingError(f"{self.run_dir}: no checkpoint to resume from; start the run "
                                "without --resume")
        if not resume and has_checkpoints:
            raise TrainingError(f"{self.run_dir}: already holds a training run; pass --resume "
                                "to continue it or set run.dir to a new directory")

    def _log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def _model_config(self) -> SkyworkMoeConfig:
        m = self.cfg.model
        base = resolve_config(m.init_from or m.config)
        hf = {**base.to_hf_dict(), **m.overrides}
        if not m.init_from:
            hf["vocab_size"] = self.tokenizer.vocab_size
            hf.update(bos_token_id=self.tokenizer.bos_id, eos_token_id=self.tokenizer.eos_id)
        config = SkyworkMoeConfig.from_hf_dict(hf)
        if config.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"model vocab_size {config.vocab_size} is smaller than the "
                              f"tokenizer's {self.tokenizer.vocab_size}")
        return config

    def _build_model(self) -> SkyworkForCausalLM:
        config = self._model_config()
        if self.cfg.lora.enabled:
            model, summary = finetune.lora_model(self.cfg, self.device)
            self._log(summary)
        elif self.cfg.model.init_from:
            model = load_model(self.cfg.model.init_from, dtype=torch.float32, device=self.device)
        else:
            model = build_model(config, device=self.device, dtype=torch.float32,
                                seed=self.cfg.train.seed)
        model.config = config  # keeps overrides (e.g. gating normalization) for saving
        if self.cfg.moe.expert_bias:
            model.enable_expert_bias()
        model.activation_checkpointing = self.cfg.train.activation_checkpointing
        # The kernel backend, chosen (and on CPU built, once per machine) here, not in a forward.
        model.use_kernels(load_kernels(self.device, progress=self._log))
        return model.train()

    def _pipeline_stages(self) -> PipelineStages:
        """This rank's stages of the full model under ``parallel.pp_layers``/``pp_recompute``."""
        config = self.model.config
        pipe = self.cfg.pipeline_layout(config.num_hidden_layers)
        rows = self.local_rows[1] - self.local_rows[0]
        if rows % self.cfg.train.micro_batch_size:
            raise ConfigError(f"with pipeline parallelism each data-parallel rank's "
                              f"{rows} rows must split into equal micro-batches of "
                              f"train.micro_batch_size = {self.cfg.train.micro_batch_size}")
        p = self.cfg.parallel
        stages = stages_of_rank(p.pp_schedule, self.mesh.coords.pp, p.pp, pipe.stages)
        self._log(f"pipeline: {pipe.describe()} over {pipe.stages} stages on {p.pp} ranks, "
                  f"{p.pp_schedule} schedule")
        return PipelineStages(self.model, pipe, stages)

    def _pipeline_schedule(self, stages: PipelineStages) -> step_ops.PipelineSteps:
        t = self.cfg.train
        if not SCHEDULES[self.cfg.parallel.pp_schedule].forward_only:
            self._log(f"note: the {self.cfg.parallel.pp_schedule} schedule cannot run "
                      "forward-only passes (torch.distributed.pipelining), so this run "
                      "computes no validation loss")
        rows = self.local_rows[1] - self.local_rows[0]
        return step_ops.PipelineSteps(build_schedule(
            stages, self.mesh, rows // t.micro_batch_size, t.micro_batch_size,
            self.cfg.data.seq_len, self.cfg.parallel.pp_schedule,
            torch.bfloat16 if t.precision == "bf16" else torch.float32, self.device,
            self._autocast))

    def _build_optimizer(self) -> torch.optim.Optimizer:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        decay, no_decay = _param_groups((n, p.shape) for n, p in params.items())
        t = self.cfg.train
        return torch.optim.AdamW(
            [{"params": [params[n] for n in decay], "weight_decay": t.weight_decay},
             {"params": [params[n] for n in no_decay], "weight_decay": 0.0}],
            lr=lr_at(0, self.cfg), betas=(t.beta1, t.beta2),
            fused=self.device.type in ("cpu", "cuda"))  # one kernel: 7x faster on CPU

    def _resume_model(self) -> None:
        """RNG and trainer state, and the weights into the full model before sharding; from a
        sharded checkpoint only the routing biases (every rank keeps all layers'), the rest
        after sharding."""
        path = run_state.latest_checkpoint(self.run_dir)
        if run_state.is_sharded(path):
            state = run_state.resume_state(path, self.model.config)
            biases = {k: p for k, p in sharded_state.model_pieces(self.model).items()
                      if k.endswith(".expert_bias")}
            load_pieces(biases, path / run_state.SHARDED, self.checkpoint_group)
        else:
            state = run_state.load_checkpoint(path, self.model)
        self._resumed_state = state
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        self.controller.load_state_dict(state["controller"])
        self.last_checkpoint = path
        self._log(f"resumed from {path} (step {self.step})")

    def _resume_optimizer(self) -> None:
        """This rank's part of the saved optimizer state."""
        if run_state.is_sharded(self.last_checkpoint):
            sharded_state.empty_optimizer_state(self.optimizer, self.model, self.dp,
                                                int(self._resumed_state["optimizer_step"]))
            load_pieces(sharded_state.optimizer_pieces(self.optimizer, self.model, self.dp,
                                                       self.placements),
                        self.last_checkpoint / run_state.SHARDED, self.checkpoint_group)
            return
        file = self.last_checkpoint / run_state.TRAINING / run_state.OPTIMIZER
        saved = run_state.read_optimizer_state(file)
        try:
            full_state.restore_optimizer_state(self.optimizer, saved, self.model,
                                                        self.dp, self.mesh, self.full_groups)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise TrainingError(f"{file}: does not match this run's optimizer ({exc}); resume "
                                "with the model and settings the run was saved with") from None

    def close(self) -> None:
        """Finish a checkpoint still being written (unless the run failed), then leave the
        process group (under torchrun); the trainer cannot train afterwards."""
        if not self._failed:
            self.wait_for_checkpoint()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _barrier(self) -> None:
        if self.mesh.world.active:
            torch.distributed.barrier(group=self.mesh.world.pg)

    # ----------------------------------------------------------------------------- training
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def accumulate_gradients(self, batch: Batch | torch.Tensor, local: bool = False
                             ) -> tuple[float, float]:
        """Fill ``.grad`` with the gradient of the batch's loss (CE + aux terms), accumulated
        over micro-batches. Returns (loss, CE loss). ``batch``: the whole batch (a ``Batch``,
        or token rows that are their own labels), or with ``local`` only this data-parallel
        rank's rows."""
        self.optimizer.zero_grad(set_to_none=True)
        self.stats.reset()
        batch = Batch.of(batch)
        if not local:
            batch = batch.rows(*self.local_rows)  # this rank's rows
        return step_ops.accumulate_gradients(self.steps, batch.to(self.device), self.balance(),
                                             self.dp, self.stats)

    def balance(self) -> MoEBalance:
        """The MoE routing options and the controller's current coefficients, for a step."""
        return MoEBalance.for_layers(self.moe_options, self.moe_layers, self.controller.alphas)

    def train_step(self, batch: Batch | torch.Tensor, local: bool = False) -> StepResult:
        """Gradients of one batch (all of it, or with ``local`` this rank's rows), clipping
        and the AdamW update. A non-finite loss or gradient raises TrainingError, or with
        ``skip_nonfinite`` skips the update."""
        t = self.cfg.train
        total, ce_total = self.accumulate_gradients(batch, local)
        grad_norm = self.dp.clip_grad_norm(t.grad_clip)
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            what = f"loss {total}" if not math.isfinite(total) else f"gradient norm {grad_norm}"
            if not t.skip_nonfinite:
                where = (f"the last good checkpoint is {self.last_checkpoint}"
                         if self.last_checkpoint else "no checkpoint was saved yet")
                raise TrainingError(f"step {self.step + 1}: {what} is not finite; {where}. "
                                    "Lower train.lr, or set train.skip_nonfinite = true to "
                                    "skip such batches")
            self._log(f"step {self.step + 1}: {what} is not finite; batch skipped")
            return StepResult(total, ce_total, grad_norm)
        step_ops.apply_update(self.optimizer, self.dp, lr_at(self.step, self.cfg))
        if self.bias_controller is not None:  # every rank has the whole step's loads
            self.bias_controller.step(self.stats.loads())
            self.bias_controller.copy_into(self.model.moe_blocks_by_layer())
        return StepResult(total, ce_total, grad_norm)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token CE over up to ``eval_batches`` held-out batches (dropless routing)."""
        if self.val_rows is None:
            return None
        t = self.cfg.train
        dp = self.mesh.dp
        rows = self.steps.eval_rows  # a pipeline evaluates a whole schedule step at a time
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64)  # CE summed over label tokens, tokens
        try:
            starts = range(0, len(self.val_rows), rows)
            for i, start in enumerate(starts[:max(1, t.eval_batches * t.micro_batch_size
                                                  // rows)]):
                if i % dp.size != dp.rank:  # data-parallel ranks share the batches
                    continue
                batch = self._batch(self.val_rows.read_range(start, start + rows))
                sums += self.steps.loss_sums(batch.to(self.device))
        finally:
            self.model.train()
        all_reduce_(sums, self.mesh.pp)
        all_reduce_(sums, dp)
        return float(sums[0] / sums[1]) if sums[1] else None

    def save(self) -> Path:
        """Write a checkpoint that resumes under any layout: sharded (every rank writes its
        own pieces) or the whole model gathered onto rank 0 as an HF directory. With
        ``train.async_checkpoint`` it is written in the background and appears at the
        returned path once written (``wait_for_checkpoint``)."""
        state = {"step": self.step, "loader": self.loader.state_dict(),
                 "controller": self.controller.state_dict(),
                 "tokens_seen": self.step * self.cfg.train.batch_size * self.cfg.data.seq_len,
                 "layout": self.mesh.layout.name}
        if self.cfg.lora.enabled:  # what `skymoe export` needs to write the adapter
            state["lora"] = {**dataclasses.asdict(self.cfg.lora),
                             "base": self.cfg.model.init_from}
        if self._saver is not None:  # the previous checkpoint until this one is written
            return self._save_sharded(state)
        if self.sharded:
            self.last_checkpoint = self._save_sharded(state)
            return self.last_checkpoint
        full_model = full_state.gather_model(self.model, self.mesh)
        optimizer_state = full_state.gather_optimizer_state(
            self.optimizer, self.model, self.dp, self.mesh, self.full_groups)
        path = (self.run_dir / run_state.CHECKPOINTS
                / run_state.step_dir_name(self.step))
        if self.is_main:
            path = run_state.save_checkpoint(
                self.run_dir, self.step, full_model, optimizer_state, state,
                tokenizer_dir=self.tokenizer_dir, keep_last=self.cfg.train.keep_last)
        self._barrier()
        self.last_checkpoint = path
        return path

    def _model_pieces(self) -> dict:
        """This rank's pieces of the model a checkpoint holds (with LoRA: what trains)."""
        return sharded_state.model_pieces(
            self.model, self.placements,
            finetune.lora_state_names(self.model) if self.cfg.lora.enabled else None)

    def wait_for_checkpoint(self) -> Path | None:
        """With ``train.async_checkpoint``: wait until the checkpoint being written is on
        disk (raising its error), and return the latest checkpoint."""
        if self._saver is not None:
            self.last_checkpoint = self._saver.wait() or self.last_checkpoint
        return self.last_checkpoint

    def _save_sharded(self, state: dict) -> Path:
        step = torch.tensor([float(sharded_state.optimizer_step(self.optimizer))])
        all_reduce_(step, self.mesh.world, torch.distributed.ReduceOp.MAX)  # one per run
        pieces = {**self._model_pieces(),
                  **sharded_state.optimizer_pieces(self.optimizer, self.model, self.dp,
                                                   self.placements)}
        config = dataclasses.replace(self.model.config, torch_dtype="float32")
        state = {**state, "optimizer_step": int(step)}
        where = dict(run_dir=self.run_dir, step=self.step, config=config,
                     tokenizer_dir=self.tokenizer_dir, keep_last=self.cfg.train.keep_last,
                     group=self.checkpoint_group)
        if self._saver is None:
            return run_state.save_sharded_checkpoint(pieces=pieces, trainer_state=state, **where)
        self.wait_for_checkpoint()
        self._saver.start(pieces, state, **where)
        return self.run_dir / run_state.CHECKPOINTS / run_state.step_dir_name(self.step)

    @property
    def stop_signal(self) -> int | None:
        """The signal (SIGINT/SIGTERM) that stopped the run early, if one did."""
        return self._stop_signal

    def _on_signal(self, signum: int, frame) -> None:
        self._stop_signal = signum

    def run(self) -> RunSummary:
        """Train until ``train.steps``; SIGINT/SIGTERM finish the current step, save and return
        (``interrupted=True``). Under torchrun, a rank that dies or stalls ends the run with a
        ``TrainingError`` naming it (see ``skymoe.parallel.health``)."""
        t = self.cfg.train
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step",
                         disable=self.quiet or None, dynamic_ncols=True)
        last: StepResult | None = None
        val_loss = None
        # Records past the step the run (re)starts from belong to steps it will redo.
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_through_step=self.step) \
            if self.is_main else None
        try:
            with guard_collectives(self.mesh, self.cfg.parallel.timeout_s):
                stopping = self._should_stop()
                if self.step == 0 and self.cfg.model.init_from and t.eval_every:
                    val_loss = self._validate()  # the starting model's, to compare with
                while self.step < t.steps and not stopping:
                    last = self._logged_step()
                    stopping = self._should_stop()  # agreed by all ranks before saving
                    if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                        val_loss = self._validate()
                    if ((t.checkpoint_every and self.step % t.checkpoint_every == 0)
                            or self.step == t.steps or stopping):
                        self.save()
                self.wait_for_checkpoint()
        except BaseException:
            self._failed = True  # close() then leaves a background save unfinished
            raise
        finally:
            self._bar.close()
            if self.metrics is not None:
                self.metrics.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return RunSummary(self.step, last.loss if last else None, val_loss, self.last_checkpoint,
                          self.run_dir, interrupted=self._stop_signal is not None)

    def _logged_step(self) -> StepResult:
        """One optimizer step on the next batch, its metrics record and progress update."""
        t = self.cfg.train
        tokens_per_step = t.batch_size * self.cfg.data.seq_len
        batch = self._batch(self.loader.next_batch(self.local_rows))  # this rank's rows only
        bias_ranges = self.bias_controller.ranges() if self.bias_controller else None
        began = time.perf_counter()
        last = self.train_step(batch, local=True)
        elapsed = time.perf_counter() - began
        self.step += 1
        record = {"kind": "train", "step": self.step, "tokens": self.step * tokens_per_step,
                  "loss": last.loss, "ce_loss": last.ce_loss, "grad_norm": last.grad_norm,
                  "lr": lr_at(self.step - 1, self.cfg),
                  "tokens_per_s": tokens_per_step / elapsed}
        if self.moe_layers:
            moe = self.stats.summary()
            moe["aux_coef"] = list(self.controller.alphas)  # the ones this step used
            if bias_ranges is not None:
                moe["expert_bias_min"], moe["expert_bias_max"] = bias_ranges
            record["moe"] = moe
            self.controller.step(self.stats.drop_rates())
        self._write_metrics(record)
        postfix = {"loss": f"{last.loss:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        if self.moe_layers:
            postfix["drop"] = f"{sum(moe['drop_rate']) / len(moe['drop_rate']):.3f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)
        return last

    def _batch(self, rows: torch.Tensor | Batch) -> Batch:
        """Rows read from the data as a batch: documents kept apart when
        ``data.isolate_documents``."""
        if self.cfg.data.isolate_documents and not isinstance(rows, Batch):
            return Batch.isolated_documents(rows, self.tokenizer.eos_id)
        return Batch.of(rows)

    def _should_stop(self) -> bool:
        """Whether a stop signal reached any rank (all ranks stop at the same step)."""
        flag = torch.tensor([0.0 if self._stop_signal is None else float(self._stop_signal)])
        all_reduce_(flag, self.mesh.world, torch.distributed.ReduceOp.MAX)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = int(flag.item())
        return self._stop_signal is not None

    def _write_metrics(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _validate(self) -> float | None:
        val_loss = self.evaluate()
        if val_loss is not None:
            self._write_metrics({"kind": "val", "step": self.step, "val_loss": val_loss,
                                 "val_ppl": math.exp(min(val_loss, 50.0))})
        return val_loss

    def sample(self, prompt: str | None = None, max_new_tokens: int | None = None) -> str:
        """A short sampled continuation from the current model (temperature 0.8, top-p 0.95);
        after fine-tuning on chats, the answer to ``prompt`` as the user's message."""
        t = self.cfg.train
        text = prompt if prompt is not None else t.sample_prompt
        if self.cfg.data.format == "sft":  # rendered as the samples were: the answer follows
            template = ChatTemplate.load(self.tokenizer_dir)
            ids = self.tokenizer.encode(template.render([{"role": "user", "content": text}]),
                                        add_bos=template.add_bos)
            shown = len(ids)
        else:  # documents were packed after an EOS, without BOS: start the prompt the same way
            ids = [self.tokenizer.eos_id] + self.tokenizer.encode(text, add_bos=False)
            shown = 1
        self.model.eval()
        try:
            new = generate(self.model, torch.tensor([ids], device=self.device),
                           max_new_tokens or t.sample_tokens,
                           SamplingParams(temperature=0.8, top_p=0.95, seed=t.seed),
                           eos_ids=[self.tokenizer.eos_id])
        finally:
            self.model.train()
        return self.tokenizer.decode(ids[shown:] + new[0].tolist())


def _param_groups(shapes: Iterable[tuple[str, Sequence[int]]]) -> list[list[str]]:
    """Parameter names with weight decay (matrices, experts, embeddings) and without (norms
    and other vectors), in model order."""
    named = list(shapes)
    return [[n for n, shape in named if len(shape) >= 2],
            [n for n, shape in named if len(shape) < 2]]

