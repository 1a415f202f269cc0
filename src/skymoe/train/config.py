"""Training configuration: one TOML file of sections, command-line overrides, a saved copy.

Every setting has a default, so ``skymoe train`` runs with no file at all (the embedded
default: a small Skywork-MoE on the Python standard library's source). A file or an override
naming an unknown section or key, or a value of the wrong type, is an error naming it.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import ConfigError
from ..model.balance import AUX_LOSS_TYPES
from ..model.lora import TARGETS as LORA_TARGETS
from ..parallel.layout import ParallelLayout, parse_layout
from ..parallel.schedules import SCHEDULES
from ..parallel.pipeline_layout import PipelineLayout, parse_counts
from .sft import LOSS_ON, TOO_LONG


@dataclass
class ModelSection:
    config: str = "tiny"          # preset name, config.json path or checkpoint directory
    init_from: str = ""           # optional HF checkpoint directory to start from (weights)
    overrides: dict = field(default_factory=dict)  # config.json keys, e.g. moe_use_logits_norm


@dataclass
class DataSection:
    sources: list = field(default_factory=list)  # files/dirs; empty: the Python stdlib source
    patterns: list = field(default_factory=lambda: ["*"])
    text_field: str = "text"
    max_bytes: int = 0            # use at most this many bytes of text (0: all)
    seq_len: int = 256
    val_fraction: float = 0.02
    prepared: list = field(default_factory=list)  # skymoe data prepare directories, instead
    #                                               of sources (their own validation split)
    weights: list = field(default_factory=list)   # mixture weights of the prepared
    #                                               directories (default: their token counts)
    format: str = "text"          # "text" (documents) or "sft": JSONL of chats (messages) or
    #                               prompt/completion pairs, loss on the answers
    loss_on: str = "completion"   # sft: "completion" (assistant turns) or "all" tokens
    too_long: str = "truncate"    # sft: a sample over seq_len is "truncate"d or "drop"ped
    pack: bool = True             # sft: several samples per row, kept apart (else one per row)
    isolate_documents: bool = False  # text: attention and positions restart at each document
    skip_bad: bool = False        # sft: skip (and count) malformed lines instead of failing


@dataclass
class TokenizerSection:
    path: str = ""                # tokenizer.json/.model directory; empty: model.init_from's, or a new BPE
    vocab_size: int = 4096        # for a trained tokenizer


@dataclass
class TrainSection:
    steps: int = 300
    batch_size: int = 16          # sequences per optimizer step
    micro_batch_size: int = 16    # sequences per forward per process (capped at batch/dp)
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 30
    lr_decay_steps: int = 0       # cosine length (0: steps); keep it fixed to extend a run
    schedule: str = "cosine"      # warmup + cosine decay, or "constant" (lr throughout)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "bf16"       # bf16 autocast over fp32 master weights, or fp32
    activation_checkpointing: bool = False
    compile: bool = False         # torch.compile each decoder layer
    keep_freed_memory: bool = True  # CPU: glibc reuses freed memory (no page faults per step)
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_last: int = 2
    checkpoint_format: str = "auto"  # "hf", "sharded" (each rank writes its own pieces), or
    #                                  "auto": sharded with several processes, else hf
    async_checkpoint: bool = False  # write sharded checkpoints in the background (a staged
    #                                 copy of this rank's pieces in memory while writing)
    skip_nonfinite: bool = False  # skip a batch whose loss is NaN/Inf instead of stopping
    sample_prompt: str = "def"
    sample_tokens: int = 48


@dataclass
class MoESection:
    """How MoE layers are balanced in training; docs/training.md ("Why these defaults") gives
    the measurements behind the defaults."""

    capacity_factor: float = 1.25  # <= 0: dropless
    drop_policy: str = "probability"
    aux_loss: str = "switch"      # or "skywork", or "global" (Switch over the whole step)
    aux_coef: float = 0.01        # initial (adaptive) or constant (fixed) coefficient
    adaptive: bool = True
    xi: float = 0.2
    alpha_max: float = 0.01
    beta: float = 0.99
    z_loss_coef: float = 0.0
    routing_group_size: int = 0   # sequences per routing group (0: the micro-batch)
    expert_bias: bool = True      # auxiliary-loss-free balancing: a routing bias per expert
    bias_update_rate: float = 1e-3  # the bias step per optimizer step (sign of the load error)


@dataclass
class ParallelSection:
    """Process layout for torchrun (see docs/distributed.md); 1 everywhere = one process."""

    dp: int = 1
    tp: int = 1
    pp: int = 1                   # pipeline stages (torch.distributed.pipelining)
    pp_layers: str = ""           # decoder layers per stage, "5,5,5,5,4" (default: even split)
    pp_recompute: str = ""        # recomputed layers per stage, "2,1,0,0,0" (default: none, or
    #                               every layer with train.activation_checkpointing)
    pp_schedule: str = "1f1b"     # 1f1b, gpipe, interleaved-1f1b, looped-bfs, zero-bubble, zbv
    pp_stages_per_rank: int = 1   # stages on each rank (interleaved / zero-bubble: 2 or more)
    ep: int = 1
    etp: int = 1
    expert: str = ""              # preset: "edp" (ep = tp), "etp" (ep = dp, etp = tp), "ep"
    zero: bool = True             # ZeRO-1: shard AdamW state over data-parallel ranks
    a2a_chunks: int = 1           # > 1: pipeline the expert all-to-all with expert compute
    timeout_s: float = 300.0      # a collective waiting longer fails the job naming the rank


@dataclass
class LoraSection:
    enabled: bool = False         # train low-rank adapters on a frozen model.init_from base
    rank: int = 16
    alpha: float = 32.0           # the adapters' output scaled by alpha / rank
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                   "experts"])  # also gate/up/down_proj
    train_router: bool = False    # the MoE routers train too (in full)
    base_dtype: str = "bf16"      # the frozen base: "bf16", "fp32", or "fp8" (an FP8
    #                               checkpoint's values kept at one byte each)


@dataclass
class RunSection:
    dir: str = "runs/default"


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    train: TrainSection = field(default_factory=TrainSection)
    moe: MoESection = field(default_factory=MoESection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> None:
        """Cross-field checks, each naming the offending key."""
        t, m, d = self.train, self.moe, self.data
        checks = [
            (t.steps >= 1, "train.steps must be >= 1"),
            (t.batch_size >= 1 and t.micro_batch_size >= 1, "batch sizes must be >= 1"),
            (t.batch_size % t.micro_batch_size == 0,
             f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
             f"({t.micro_batch_size})"),
            (m.routing_group_size == 0 or t.micro_batch_size % m.routing_group_size == 0,
             f"train.micro_batch_size ({t.micro_batch_size}) must be a multiple of "
             f"moe.routing_group_size ({m.routing_group_size})"),
            (t.lr > 0 and 0 <= t.min_lr <= t.lr, "need 0 <= train.min_lr <= train.lr, lr > 0"),
            (t.warmup_steps >= 0 and t.lr_decay_steps >= 0, "warmup/decay steps must be >= 0"),
            (t.precision in ("bf16", "fp32"), "train.precision must be 'bf16' or 'fp32'"),
            (t.schedule in ("cosine", "constant"), "train.schedule must be 'cosine' or 'constant'"),
            (t.checkpoint_format in ("auto", "hf", "sharded"),
             "train.checkpoint_format must be 'auto', 'hf' or 'sharded'"),
            (not (t.async_checkpoint and t.checkpoint_format == "hf"),
             "train.async_checkpoint writes sharded checkpoints; it cannot be combined with "
             "train.checkpoint_format = 'hf'"),
            # The MoE dispatch has data-dependent shapes; under recomputation torch.compile may
            # pick another graph than in the forward, which checkpointing rejects.
            (not (t.compile and t.activation_checkpointing),
             "train.compile and train.activation_checkpointing cannot be combined; choose one"),
            # torch 2.13's dynamo fails inside the tensor-parallel layers' hooks (an internal
            # error on the first step): refuse up front instead.
            (not (t.compile and self.parallel.tp > 1),
             "train.compile does not work with parallel.tp > 1 yet; turn one of them off"),
            (m.drop_policy in ("probability", "position"),
             "moe.drop_policy must be 'probability' or 'position'"),
            (m.aux_loss in AUX_LOSS_TYPES,
             f"moe.aux_loss must be one of {', '.join(map(repr, AUX_LOSS_TYPES))}"),
            (m.bias_update_rate >= 0, "moe.bias_update_rate must be >= 0"),
            (not (m.aux_loss == "global" and self.parallel.pp > 1
                  and self.parallel.pp_schedule in SCHEDULES
                  and not SCHEDULES[self.parallel.pp_schedule].forward_only),
             f"moe.aux_loss = 'global' needs a forward-only pipeline pass, which the "
             f"{self.parallel.pp_schedule} schedule cannot run; choose another "
             "parallel.pp_schedule"),
            (0 <= m.beta <= 1 and m.alpha_max >= 0 and m.xi >= 0 and m.aux_coef >= 0,
             "moe: need 0 <= beta <= 1 and non-negative xi, alpha_max, aux_coef"),
            (d.seq_len >= 2, "data.seq_len must be >= 2"),
            (0 <= d.val_fraction < 1, "data.val_fraction must be in [0, 1)"),
            (not (d.prepared and d.sources),
             "data.prepared and data.sources are alternatives; set one"),
            (not d.weights or (len(d.weights) == len(d.prepared)
                               and all(isinstance(w, (int, float)) and w > 0
                                       for w in d.weights)),
             "data.weights needs one positive weight per data.prepared directory"),
            (d.format in ("text", "sft"), "data.format must be 'text' or 'sft'"),
            (d.loss_on in LOSS_ON, f"data.loss_on must be one of {', '.join(LOSS_ON)}"),
            (d.too_long in TOO_LONG, f"data.too_long must be one of {', '.join(TOO_LONG)}"),
            (not (d.format == "sft" and d.prepared),
             "data.format = 'sft' reads JSONL from data.sources, not data.prepared"),
            (not (d.format == "sft" and not d.sources),
             "data.format = 'sft' needs data.sources (JSONL files of chats or prompt/"
             "completion pairs)"),
            (not (d.format == "sft" and d.pack and self.parallel.pp > 1),
             "packed fine-tuning rows cannot pass pipeline stages; set data.pack = false with "
             "parallel.pp > 1"),
            (not (d.isolate_documents and self.parallel.pp > 1),
             "data.isolate_documents does not work with parallel.pp > 1 yet"),
            (t.eval_every >= 0 and t.checkpoint_every >= 0, "intervals must be >= 0"),
            (self.parallel.expert in ("", "ep", "etp", "edp"),
             "parallel.expert must be 'ep', 'etp' or 'edp'"),
            (self.parallel.timeout_s > 0, "parallel.timeout_s must be > 0"),
            (self.parallel.a2a_chunks >= 1, "parallel.a2a_chunks must be >= 1"),
            (self.parallel.pp_schedule in SCHEDULES,
             f"parallel.pp_schedule must be one of {', '.join(SCHEDULES)}"),
            (self.parallel.pp_stages_per_rank >= 1, "parallel.pp_stages_per_rank must be >= 1"),
        ]
        for ok, message in checks + self._lora_checks():
            if not ok:
                raise ConfigError(f"training config: {message}")

    def _lora_checks(self) -> list[tuple[bool, str]]:
        lora = self.lora
        if not lora.enabled:
            return []
        return [
            (bool(self.model.init_from), "lora.enabled needs a base to adapt: set "
             "model.init_from to a checkpoint directory"),
            (lora.rank >= 1 and lora.alpha > 0, "lora.rank must be >= 1 and lora.alpha > 0"),
            (0 <= lora.dropout < 1, "lora.dropout must be in [0, 1)"),
            (bool(lora.targets) and all(t in LORA_TARGETS for t in lora.targets),
             f"lora.targets must be names among {', '.join(LORA_TARGETS)}"),
            (lora.base_dtype in ("bf16", "fp32", "fp8"),
             "lora.base_dtype must be 'bf16', 'fp32' or 'fp8'"),
            (not self.train.compile, "train.compile does not work with lora.enabled yet"),
            (self.train.checkpoint_format != "hf", "a LoRA run's checkpoints hold the adapters "
             "(sharded format); train.checkpoint_format = 'hf' does not apply"),
            (lora.base_dtype == "fp32" or self.train.precision == "bf16",
             f"lora.base_dtype = {lora.base_dtype!r} computes in bf16: set train.precision = "
             "'bf16' (or lora.base_dtype = 'fp32')"),
        ]

    def layout(self) -> ParallelLayout:
        """The ``ParallelLayout`` of the [parallel] section."""
        p = self.parallel
        return parse_layout({"dp": p.dp, "tp": p.tp, "pp": p.pp, "ep": p.ep, "etp": p.etp,
                             "expert": p.expert})

    def pipeline_layout(self, num_layers: int) -> PipelineLayout:
        """Layers and recomputed layers per stage (``pp * pp_stages_per_rank`` stages) for a
        model of ``num_layers`` layers: ``parallel.pp_layers`` / ``pp_recompute``, by default
        an even split recomputing nothing (every layer with ``train.activation_checkpointing``)."""
        p = self.parallel
        stages = p.pp * p.pp_stages_per_rank
        layers = (parse_counts(p.pp_layers, "parallel.pp_layers") if p.pp_layers
                  else PipelineLayout.uniform(num_layers, stages).layers)
        if p.pp_recompute:
            recompute = parse_counts(p.pp_recompute, "parallel.pp_recompute")
        else:
            recompute = layers if self.train.activation_checkpointing else ()
        layout = PipelineLayout(layers, recompute)
        return layout.validate(num_layers, stages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as TOML (atomically: a crash never leaves half a file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(tomli_w.dumps(self.to_dict()).encode())
        os.replace(tmp, path)


def _coerce(where: str, default: Any, value: Any) -> Any:
    """``value`` checked against the type of the setting's default (ints accepted as floats;
    an int or a list of ints where text is expected, as for ``parallel.pp_layers = [3, 2]``
    or ``--set parallel.pp_layers=8``, become ``"3,2"`` / ``"8"``)."""
    if isinstance(default, str) and _is_int(value):
        value = str(value)
    elif isinstance(default, str) and isinstance(value, list) and all(map(_is_int, value)):
        value = ",".join(map(str, value))
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"training config: {where} must be a {type(default).__name__}, "
                          f"got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """A config from nested dicts (a parsed TOML file); unknown names are errors."""
    config = TrainConfig()
    for section_name, values in data.items():
        section = getattr(config, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            known = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
            raise ConfigError(f"{source}: unknown section [{section_name}] (known: {known})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section_name}] must be a table of settings")
        for key, value in values.items():
            _set(section, section_name, key, value, source)
    config.validate()
    return config


def _set(section: Any, section_name: str, key: str, value: Any, source: str) -> None:
    names = {f.name for f in dataclasses.fields(section)}
    if key not in names:
        raise ConfigError(f"{source}: unknown setting {section_name}.{key} "
                          f"(known: {', '.join(sorted(names))})")
    setattr(section, key, _coerce(f"{section_name}.{key}", getattr(section, key), value))


def load(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The defaults, updated by the TOML file at ``path`` (if any), then by ``overrides`` of
    the form ``section.key=value`` or ``section.table.key=value`` (value in TOML syntax; bare
    words are strings)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: training config not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for item in overrides:
        name, sep, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"override {item!r}: use section.key=value, e.g. train.lr=1e-3")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"override {item!r}: [{section}] is not a table")
        key, dot, subkey = key.partition(".")  # model.overrides.moe_use_logits_norm=false
        value = _parse_value(raw.strip())
        if dot:
            table = data[section].setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"override {item!r}: {section}.{key} is not a table")
            table[subkey] = value
        else:
            data[section][key] = value
    return from_dict(data, str(path) if path is not None else "overrides")


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word such as a path or a policy name
