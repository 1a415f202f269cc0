"""Training step: skymoe vs HF transformers' MixtralForCausalLM with its own aux loss.

Both sides train the same weights on the same batch (the shared "bench" config, batch 8 x 512
tokens): fp32 master weights, bf16 autocast, forward + backward + gradient clipping + AdamW.
skymoe runs as ``skymoe train`` does (capacity factor 1.0, Skywork aux loss with a coefficient,
per-layer statistics); transformers runs ``output_router_logits=True`` (its load-balancing
loss, ``router_aux_loss_coef`` 0.001) with its default experts implementation.

On CPU skymoe keeps freed memory in the process (``skymoe.runtime.keep_freed_memory``, as
``skymoe train`` does); ``--hf-keep-freed`` gives transformers the same setting.

Each side runs in its own process so that its peak memory is its own: peak RSS growth over the
loaded model on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Processes alternate
(skymoe, transformers, skymoe, ...) so that machine drift hits both; medians are reported.

Usage: python benchmarks/bench_train.py [--steps 4] [--rounds 2] [--device cpu|cuda] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import skymoe
from skymoe.config import resolve_config
from skymoe.runtime import keep_freed_memory

SIDES = ("skymoe", "transformers")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _skymoe_step(ckpt: Path, device: str, compile_layers: bool):
    from skymoe.kernels import load_kernels
    from skymoe.model.moe import MoEBalance, MoETrainingOptions

    model = skymoe.load_model(ckpt, dtype=torch.float32, device=device).train()
    model.use_kernels(load_kernels(device))
    balance = MoEBalance(MoETrainingOptions(capacity_factor=1.0),
                         dict.fromkeys(range(model.config.num_hidden_layers), 0.001))
    if compile_layers:
        model.compile_layers()

    def loss_of(ids):
        out = model(ids, labels=ids, balance=balance)
        return out.loss + out.aux_loss
    return model, loss_of


def _hf_step(ckpt: Path, device: str, compile_layers: bool):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device).train()

    def loss_of(ids):
        return model(input_ids=ids, labels=ids, output_router_logits=True).loss
    return model, loss_of


def worker(side: str, ckpt: Path, steps: int, device: str, batch: int, seq: int,
           compile_layers: bool, hf_keep_freed: bool) -> dict:
    """Time ``steps`` training steps (after one warm-up) of one side; report its peak memory."""
    torch.manual_seed(0)
    if device == "cpu" and (side == "skymoe" or hf_keep_freed):
        keep_freed_memory()  # what `skymoe train` does on CPU (train.keep_freed_memory)
    build = _skymoe_step if side == "skymoe" else _hf_step
    model, loss_of = build(ckpt, device, compile_layers)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), device=device)
    seconds, base, peak = time_training(loss_of, model.parameters(), ids, steps, device,
                                        weight_decay=0.1)
    return {"seconds": seconds, "peak_bytes": peak - base, "tokens": batch * seq}


def time_training(loss_of, params, ids: torch.Tensor, steps: int, device: str,
                  weight_decay: float) -> tuple[float, int, int]:
    """AdamW steps on ``params`` (bf16 autocast, gradient clipping), one to warm up, then
    ``steps`` timed: (median seconds, memory before, peak memory), in process RSS on CPU,
    allocated CUDA memory on CUDA."""
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=weight_decay, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_of(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    base = _rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss_bytes()
    return statistics.median(times), base, peak


def step_parser(doc: str, sides: tuple[str, ...], steps: int) -> argparse.ArgumentParser:
    """The flags of a training-step benchmark whose sides run as ``--worker`` processes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per side")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--worker", choices=sides, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = step_parser(__doc__, SIDES, steps=4)
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile skymoe's decoder layers")
    parser.add_argument("--hf-keep-freed", action="store_true",
                        help="give transformers skymoe's CPU allocator setting too")
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.steps, args.device, args.batch,
                                args.seq, args.compile, args.hf_keep_freed)))
        return

    config = resolve_config("bench")
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        skymoe.save_model(skymoe.build_model(config, dtype=torch.float32, seed=0), tmp,
                          model_type="mixtral")
        for _ in range(args.rounds):
            for side in SIDES:
                cmd = [sys.executable, __file__, "--worker", side, "--ckpt", tmp,
                       "--steps", str(args.steps), "--device", args.device,
                       "--batch", str(args.batch), "--seq", str(args.seq)]
                cmd += ["--compile"] * args.compile + ["--hf-keep-freed"] * args.hf_keep_freed
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))

    summary = {}
    for side, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        summary[side] = {"tokens_per_s": runs[0]["tokens"] / seconds,
                         "peak_mib": statistics.median(r["peak_bytes"] for r in runs) / 2**20}
    ratio = summary["skymoe"]["tokens_per_s"] / summary["transformers"]["tokens_per_s"]
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine()
    print(f"device: {where}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"batch {args.batch} x {args.seq}, bf16 autocast, AdamW")
    print(f"{'':<14} {'skymoe':>10} {'transformers':>13} {'ratio':>7}")
    print(f"{'tokens/s':<14} {summary['skymoe']['tokens_per_s']:>10.1f} "
          f"{summary['transformers']['tokens_per_s']:>13.1f} {ratio:>6.2f}x")
    print(f"{'peak MiB':<14} {summary['skymoe']['peak_mib']:>10.0f} "
          f"{summary['transformers']['peak_mib']:>13.0f}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": results, "ratio": ratio},
                                        indent=2))


if __name__ == "__main__":
    main()
