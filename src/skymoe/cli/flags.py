"""Flags shared by several commands, each defined once so that it means one thing everywhere.

Groups: the model (``MODEL``, always the first positional argument: ``add_model``), loading it
(``--dtype``, ``--fp8``, ``--threads``: ``add_loading``, ``load``), tensor parallelism
(``--tp``: ``add_tp``), sampling (``--temperature``, ``--top-k``, ``--top-p``, ``--seed``:
``add_sampling``, ``sampling_params``), written checkpoints (``--overwrite``,
``--max-shard-size``: ``add_output``), benchmark workloads (``--num-prompts``, ``--input-len``,
``--output-len``, ``--seed``: ``add_workload``) and the API key (``--api-key``: ``add_api_key``,
``api_key``).

Where a flag meant different things in different commands, one meaning won and the other
command got a new spelling; the old spelling still works and prints a deprecation warning on
stderr (``DeprecatedAlias``):

- ``--fp8`` is how an FP8 checkpoint is held when loaded (``auto|keep|dequantize``). ``quantize``
  used a boolean ``--fp8`` for its output format: that is now ``quantize --to fp8``, room for
  other formats; ``quantize --fp8`` is its deprecated alias.
- ``--dtype`` is a torch dtype (``auto|float32|bfloat16|float16``) the weights are loaded in.
  ``plan serve`` used it for the planned storage format (``fp8|bf16|fp16|fp32``, no ``auto``):
  that is now ``--weight-dtype``, next to ``--kv-dtype``; ``plan serve --dtype`` is its alias.
- ``MODEL`` is positional; ``plan serve --model M`` (an option only there) is the deprecated
  alias of ``plan serve M``. ``--model`` is left to ``bench serve``, as the model id a server
  lists, the meaning it has in the OpenAI API.
- ``--tp`` is kept in ``plan pipeline``: it is the tensor-parallel size there as in ``generate``
  and ``serve`` (and ``parallel.tp`` in the training config); those two run it as that many
  torchrun processes, the planner models it. A second spelling of one size would be the drift.

``--dtype`` defaults to ``auto`` (the config's ``torch_dtype``) except where a command needs
one precision whatever the checkpoint holds: ``eval`` (float32) and ``bench generate``
(bfloat16) say why in their help.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..checkpoint.adapter import load_adapter
from ..checkpoint.chat_template import TEMPLATE_FILE
from ..checkpoint.fp8 import FP8_MODES
from ..errors import SkymoeError
from ..infer import SamplingParams
from ..model.fp8 import quantize_lm_head
from ..model.lora import merge_lora
from ..model.transformer import SkyworkForCausalLM

TEMPLATE_SOURCES = (TEMPLATE_FILE, "tokenizer_config.json")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}

CHECKPOINT = "checkpoint directory (with tokenizer.json or tokenizer.model)"
ANY_MODEL = "preset name (e.g. skywork-moe-base), config.json or checkpoint directory"
FP8_HELP = ("FP8 checkpoints: auto (FP8 modules; FP8 matmuls on sm_89+ GPUs), keep (one byte "
            "per weight in memory), dequantize (plain weights)")


class UsageError(SkymoeError):
    """A command-line argument that cannot be used."""


class DeprecatedAlias(argparse.Action):
    """An old spelling that still works: it sets its replacement's value (``const`` for a flag
    without a value) and warns on stderr that ``use`` is the spelling to use."""

    def __init__(self, option_strings: list[str], dest: str, use: str, **kwargs) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)  # the replacement's default stands
        kwargs.setdefault("help", f"deprecated: use {use}")
        super().__init__(option_strings, dest, **kwargs)
        self.use = use

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.use}",
              file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_model(p: argparse.ArgumentParser, help: str = CHECKPOINT) -> None:
    """The model a command works on, the first positional argument ``MODEL``."""
    p.add_argument("model", metavar="MODEL", help=help)


def add_dtype(p: argparse.ArgumentParser, default: str = "auto", why: str = "") -> None:
    """``--dtype``: the torch dtype the weights are created or loaded in (and so computed in).
    ``auto`` is the config's ``torch_dtype``; a command with another default says ``why``."""
    shown = f"{default}: {why}" if why else "auto: the config's torch_dtype"
    p.add_argument("--dtype", choices=list(DTYPES), default=default,
                   help=f"weight dtype (default {shown})")


def add_loading(p: argparse.ArgumentParser, dtype: str = "auto", why: str = "",
                threads: bool = True) -> None:
    """How a checkpoint is loaded: ``--dtype``, ``--fp8`` and (unless ``threads`` is False)
    ``--threads``."""
    add_dtype(p, dtype, why)
    p.add_argument("--fp8", choices=FP8_MODES, default="auto", help=FP8_HELP)
    p.add_argument("--fp8-lm-head", action="store_true",
                   help="quantize the LM head to FP8 at load (one scale per vocabulary row), "
                        "so decoding reads 8-bit weights throughout; for inference only "
                        "(docs/inference.md)")
    if threads:
        p.add_argument("--threads", type=int, default=0,
                       help="CPU threads (default: torch's choice)")


def add_adapter(p: argparse.ArgumentParser) -> None:
    """``--adapter``: a LoRA adapter merged into the loaded weights."""
    p.add_argument("--adapter", metavar="DIR",
                   help="a LoRA adapter directory (PEFT format, e.g. skymoe export of a LoRA "
                        "run) folded into the weights at load; its chat template, if it has "
                        "one, is used")


def load(args: argparse.Namespace) -> SkyworkForCausalLM:
    """The checkpoint MODEL loaded as ``--dtype`` and ``--fp8`` say, on ``--threads`` threads
    (where the command has that flag), with ``--adapter`` merged (where it has that flag)."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=DTYPES[args.dtype], fp8=args.fp8)
    if getattr(args, "adapter", None):
        load_adapter(model, args.adapter, model.config.model_type)
        try:
            merge_lora(model)
        except ValueError:
            raise UsageError(f"{args.model} holds FP8 weights, which an adapter cannot be "
                             "folded into in place: load it with --fp8 dequantize, or write a "
                             "merged checkpoint with skymoe merge --to fp8") from None
    return lm_head(model, args)


def lm_head(model: SkyworkForCausalLM, args: argparse.Namespace) -> SkyworkForCausalLM:
    """``model`` with its LM head quantized to FP8 where ``--fp8-lm-head`` asks for it."""
    if getattr(args, "fp8_lm_head", False):
        if getattr(args, "tp", 1) > 1:
            raise UsageError("--fp8-lm-head works on one process; drop it or --tp")
        quantize_lm_head(model)
    return model


def template_dir(args: argparse.Namespace) -> str:
    """Where the chat template comes from: ``--adapter``'s directory when it has a tokenizer
    (a fine-tuned run's, with the template it trained on), else MODEL."""
    adapter = getattr(args, "adapter", None)
    if adapter and any((Path(adapter) / f).is_file() for f in TEMPLATE_SOURCES):
        return adapter
    return args.model


def add_tp(p: argparse.ArgumentParser, how: str) -> None:
    """``--tp``: the tensor-parallel size, the ranks that shard every layer, whether the command
    runs them or models them; ``how`` says which."""
    p.add_argument("--tp", type=int, default=1,
                   help=f"tensor-parallel size, ranks sharding every layer (default 1): {how}")


def add_sampling(p: argparse.ArgumentParser) -> None:
    """``--temperature``, ``--top-k``, ``--top-p`` and ``--seed``: greedy by default."""
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed for reproducible output")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags as ``SamplingParams``; a value out of range is a ``UsageError``."""
    try:
        return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def add_output(p: argparse.ArgumentParser, shards: bool = True,
               refused: str = "an existing") -> None:
    """``--overwrite`` and (with ``shards``) ``--max-shard-size`` for a written checkpoint;
    ``refused`` says which output directory the command refuses without ``--overwrite``."""
    if shards:
        p.add_argument("--max-shard-size", default="5GB", help="output shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {refused} output directory")


def add_workload(p: argparse.ArgumentParser, seed_help: str) -> None:
    """A benchmark's requests: random prompts of exactly ``--input-len`` tokens, each
    generating exactly ``--output-len`` tokens."""
    p.add_argument("--num-prompts", type=int, default=32, help="requests (default 32)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--output-len", type=int, default=32, help="output tokens (default 32)")
    p.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")


def add_api_key(p: argparse.ArgumentParser, help: str) -> None:
    """``--api-key``, falling back to ``$SKYMOE_API_KEY``."""
    p.add_argument("--api-key", help=help)


def api_key(args: argparse.Namespace) -> str | None:
    """``--api-key``, else ``$SKYMOE_API_KEY``; an empty key is none."""
    key = args.api_key if args.api_key is not None else os.environ.get("SKYMOE_API_KEY")
    return key or None


def require_positive(**values: int) -> None:
    """Raise a ``UsageError`` naming the first flag (``max_batch`` -> ``--max-batch``) whose
    value is below 1."""
    for name, value in values.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
