"""LoRA training step: skymoe vs transformers + PEFT, and skymoe's FP8 base vs its bf16 base.

The shared "bench" config (Mixtral layout: 8 layers of 16 experts, top-2), the same weights,
the same batch (8 x 512 tokens). Rank 16, alpha 32, on q/k/v/o and on every expert: skymoe's
per-expert factors on its stacked w13/w2 (computed in the grouped expert path), PEFT's
``target_parameters`` on Mixtral's fused ``experts.gate_up_proj`` / ``experts.down_proj``
(transformers >= 5). The frozen base is bf16 on both sides (skymoe also with an FP8 base: the
checkpoint quantized by ``skymoe quantize``, values kept at one byte); adapters fp32, bf16
autocast, AdamW over the adapters only, gradient clipping. The routers are frozen, so neither
side adds a balancing loss (skymoe routes at capacity factor 1.0, as training does).

Each side runs in its own process, alternating over ``--rounds``; reported: the median step
time as tokens/s, and the peak memory growth over the loaded model (peak RSS on CPU, which
the base's own bytes are not part of; ``torch.cuda.max_memory_allocated`` growth on CUDA) and
the process's whole peak (base included), where the FP8 base shows.

Usage: python benchmarks/bench_lora.py [--steps 3] [--rounds 2] [--device cpu|cuda] [--json F]
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import skymoe
from bench_train import _rss_bytes, step_parser, time_training  # this directory: run as a script
from skymoe.config import resolve_config
from skymoe.runtime import keep_freed_memory

SIDES = ("skymoe-bf16", "skymoe-fp8", "peft")
RANK, ALPHA = 16, 32.0
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _skymoe(ckpt: Path, device: str):
    from skymoe.kernels import load_kernels
    from skymoe.model.lora import LoRAConfig, add_lora
    from skymoe.model.moe import MoEBalance, MoETrainingOptions

    model = skymoe.load_model(ckpt, dtype=torch.bfloat16, device=device, fp8="keep").train()
    model.use_kernels(load_kernels(device))
    add_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA, targets=(*ATTENTION, "experts")))
    balance = MoEBalance(MoETrainingOptions(capacity_factor=1.0),
                         dict.fromkeys(range(model.config.num_hidden_layers), 0.0))

    def loss_of(ids):
        return model(ids, labels=ids, balance=balance).loss
    return model, loss_of


def _peft(ckpt: Path, device: str):
    import peft
    from transformers import MixtralForCausalLM

    base = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).to(device)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=ATTENTION,
        target_parameters=["experts.gate_up_proj", "experts.down_proj"])).train()

    def loss_of(ids):
        return model(input_ids=ids, labels=ids).loss
    return model, loss_of


def worker(side: str, ckpt: Path, steps: int, device: str, batch: int, seq: int) -> dict:
    """Time ``steps`` LoRA steps (after one warm-up) of one side; report its memory."""
    torch.manual_seed(0)
    if device == "cpu" and side.startswith("skymoe"):
        keep_freed_memory()  # what `skymoe train` does on CPU (train.keep_freed_memory)
    loaded = _rss_bytes()
    model, loss_of = (_peft if side == "peft" else _skymoe)(ckpt, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), device=device)
    model_bytes = (torch.cuda.memory_allocated() if device == "cuda"
                   else _rss_bytes() - loaded)
    seconds, base, peak = time_training(loss_of, trainable, ids, steps, device,
                                        weight_decay=0.0)
    return {"seconds": seconds, "growth_bytes": peak - base,
            "model_bytes": model_bytes, "peak_bytes": peak, "tokens": batch * seq,
            "trainable": sum(p.numel() for p in trainable)}


def main() -> None:
    args = step_parser(__doc__, SIDES, steps=3).parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.steps, args.device, args.batch,
                                args.seq)))
        return

    from skymoe.quantize import quantize_checkpoint

    config = resolve_config("bench")
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = Path(tmp) / "bf16"
        skymoe.save_model(skymoe.build_model(config, dtype=torch.bfloat16, seed=0), bf16,
                          model_type="mixtral")
        fp8 = quantize_checkpoint(bf16, Path(tmp) / "fp8", show_progress=False)
        for _ in range(args.rounds):
            for side in SIDES:
                cmd = [sys.executable, __file__, "--worker", side,
                       "--ckpt", str(fp8 if side == "skymoe-fp8" else bf16),
                       "--steps", str(args.steps), "--device", args.device,
                       "--batch", str(args.batch), "--seq", str(args.seq)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
                results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))

    summary = {}
    for side, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        summary[side] = {"tokens_per_s": runs[0]["tokens"] / seconds,
                         "trainable": runs[0]["trainable"],
                         **{k.replace("_bytes", "_mib"): statistics.median(r[k] for r in runs)
                            / 2**20 for k in ("growth_bytes", "model_bytes", "peak_bytes")}}
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine()
    print(f"device: {where}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"batch {args.batch} x {args.seq}, LoRA r{RANK} on q/k/v/o + experts, bf16 autocast")
    print(f"{'':<13} {'tokens/s':>9} {'trainable':>11} {'model MiB':>10} "
          f"{'growth MiB':>11} {'peak MiB':>9}")
    for side, s in summary.items():
        print(f"{side:<13} {s['tokens_per_s']:>9.1f} {s['trainable']:>11,} "
              f"{s['model_mib']:>10.0f} {s['growth_mib']:>11.0f} {s['peak_mib']:>9.0f}")
    sky, hf, f8 = summary["skymoe-bf16"], summary["peft"], summary["skymoe-fp8"]
    print(f"skymoe-bf16 / peft: tokens/s {sky['tokens_per_s'] / hf['tokens_per_s']:.2f}x, "
          f"growth {sky['growth_mib'] / hf['growth_mib']:.2f}x, "
          f"peak {sky['peak_mib'] / hf['peak_mib']:.2f}x")
    print(f"skymoe-fp8 / skymoe-bf16: peak {f8['peak_mib'] / sky['peak_mib']:.2f}x, "
          f"growth {f8['growth_mib'] / sky['growth_mib']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
