"""``skymoe info`` (a model's architecture and sizes) and ``skymoe init`` (a random model)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from ..checkpoint import save_byte_tokenizer, save_model
from ..checkpoint.io import tensor_infos
from ..checkpoint.tokenizer import BYTE_VOCAB_SIZE
from ..config import SkyworkMoeConfig, format_count, parameter_counts, resolve_config
from ..model import build_model
from . import flags
from .flags import UsageError


def register(top: argparse._SubParsersAction) -> None:
    """Add ``info`` and ``init``."""
    p = top.add_parser(
        "info", help="architecture, parameter counts and weight sizes",
        description="Show the architecture, total and active parameters and the bytes per "
                    "dtype of a checkpoint directory, a config.json or a preset (tiny, bench, "
                    "skywork-moe-base).")
    flags.add_model(p, flags.ANY_MODEL)
    p.set_defaults(func=cmd_info)

    p = top.add_parser(
        "init", help="create a randomly initialized model from a config",
        description="Write a randomly initialized model (HF format, safetensors) with a "
                    "byte-level tokenizer, for trying things out.")
    p.add_argument("out", help="output directory")
    p.add_argument("--config", required=True,
                   help="config.json path or preset name (tiny, bench, skywork-moe-base)")
    p.add_argument("--seed", type=int, default=0, help="initialization seed (default 0)")
    flags.add_dtype(p)
    flags.add_output(p, shards=False, refused="a non-empty")
    p.set_defaults(func=cmd_init)


def cmd_info(args: argparse.Namespace) -> None:
    """Print the architecture rows, then the weights by dtype (or the config's bf16 size)."""
    config = resolve_config(args.model)
    path = Path(args.model)
    rows = _architecture(config)
    if path.is_dir():
        rows += _weights(path)
    else:
        total = parameter_counts(config)["total"]
        rows.append(("bf16 size", f"{total * 2 / 1e9:,.2f} GB (from the config)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _architecture(c: SkyworkMoeConfig) -> list[tuple[str, str]]:
    counts = parameter_counts(c)
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    rows = [
        ("model", f"{c.model_type}, {c.num_hidden_layers} layers "
                  f"({moe_layers} MoE, {c.num_hidden_layers - moe_layers} dense)"),
        ("attention", f"hidden {c.hidden_size}, heads {c.num_attention_heads} / kv "
                      f"{c.num_key_value_heads}, head dim {c.head_size}"),
        ("ffn", f"SwiGLU, intermediate {c.intermediate_size}"),
    ]
    if c.is_moe:
        norm = f"on (lambda {c.moe_gate_norm_std})" if c.moe_use_logits_norm else "off"
        gate = "2-layer" if c.moe_2layer_gate else "1-layer"
        scaled = "" if c.moe_feature_no_mul_topk else "; expert input x top-k"
        rows.append(("experts", f"{c.num_experts} per MoE layer, top-{c.num_experts_per_tok}, "
                                f"every {c.moe_expert_interval} layer(s); gating logit norm "
                                f"{norm}; {gate} gate{scaled}"))
    return rows + [
        ("vocab", f"{c.vocab_size} tokens, context {c.max_position_embeddings}, "
                  f"RoPE theta {c.rope_theta:g}, tied embeddings {c.tie_word_embeddings}"),
        ("parameters", f"total {format_count(counts['total'])} "
                       f"({counts['total']:,}); embeddings {format_count(counts['embedding'])}"),
        ("active/token", f"{format_count(counts['active'])} with embeddings, "
                         f"{format_count(counts['active_non_embedding'])} without"),
    ]


def _weights(path: Path) -> list[tuple[str, str]]:
    """Rows of the checkpoint's tensors by dtype (read from the file headers) and its files."""

    infos = tensor_infos(path)
    by_dtype: dict[str, list[int]] = {}  # dtype -> [tensors, values, bytes]
    for dtype, shape, _ in infos.values():
        numel = 1
        for s in shape:
            numel *= s
        entry = by_dtype.setdefault(str(dtype).replace("torch.", ""), [0, 0, 0])
        entry[0] += 1
        entry[1] += numel
        entry[2] += numel * torch.empty((), dtype=dtype).element_size()
    rows = [(f"weights {name}", f"{nbytes / 1e6:,.1f} MB in {n} tensors "
                                f"({format_count(numel)} values)")
            for name, (n, numel, nbytes) in sorted(by_dtype.items())]
    files = {f for _, _, f in infos.values()}
    return rows + [("files", f"{len(files)} weight file(s) in {path}")]


def cmd_init(args: argparse.Namespace) -> None:
    """Write a random model and a byte-level tokenizer to OUT."""

    config = resolve_config(args.config)
    out = Path(args.out)
    if config.vocab_size < BYTE_VOCAB_SIZE:
        raise UsageError(f"{args.config}: vocab_size {config.vocab_size} is too small for the "
                         f"byte-level tokenizer ({BYTE_VOCAB_SIZE} ids)")
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise UsageError(f"{out}: exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    dtype = flags.DTYPES[args.dtype] or config.dtype
    model = build_model(config, dtype=dtype, seed=args.seed)
    save_model(model, out)
    save_byte_tokenizer(out)
    total = parameter_counts(config)["total"]
    print(f"wrote a randomly initialized {config.model_type} model ({format_count(total)} "
          f"parameters, {str(dtype).replace('torch.', '')}, seed {args.seed}) to {out}")
