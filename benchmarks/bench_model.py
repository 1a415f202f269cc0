"""skymoe vs HF transformers' MixtralForCausalLM on the shared "bench" config, in one run.

Measures, with identical weights and inputs:
- forward+backward training throughput (tokens/s) on batch 8 x 512 tokens, skymoe with its
  decoder layers compiled (``compile_layers``, what ``skymoe train`` does) and eager;
- greedy decode throughput (new tokens/s) for 64-token prompts and 32 new tokens, batch 1 and 16:
  with the prefill in the time, and of the decode steps alone (generate 32 minus generate 1);
- skymoe's forward+backward FLOP/s as a fraction of a plain bf16 matmul's FLOP/s.

HF runs its default experts implementation; if that cannot run backward on this device, the
fastest of its implementations that can is used for training, and the table names it.

Usage: python benchmarks/bench_model.py [--steps 5] [--dtype bfloat16] [--json out.json]
       [--decode-only]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import skymoe
from skymoe.arithmetic import flops_per_token
from skymoe.config import SkyworkMoeConfig
from skymoe.infer import generate
from skymoe.infer.prepare import prepare
from skymoe.kernels import load_kernels

BENCH_CONFIG = Path(skymoe.__file__).parent / "configs" / "bench.json"


def timed(fn, steps: int, warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_alternating(fns, steps: int) -> list[float]:
    """Median seconds per call of each function, run in turn so that drift in the machine's
    speed (shared hosts) hits all sides alike. One untimed warm-up call each (compilation)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def matmul_flops(dtype: torch.dtype, n: int = 2048, steps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, steps, warmup=2)


def train_step(model, ids, hf: bool):
    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids) if hf else model(ids, labels=ids)
        out.loss.backward()
    return step


def hf_train_impl(model, ids) -> str:
    """HF's default experts implementation if its backward runs, else the fastest that does."""
    candidates = [model.config._experts_implementation, "batched_mm", "eager"]
    best, best_t = None, float("inf")
    for impl in dict.fromkeys(candidates):
        model.set_experts_implementation(impl)
        try:
            t = timed(train_step(model, ids[:1, :128], True), 1, warmup=1)
        except RuntimeError:
            continue
        if t < best_t:
            best, best_t = impl, t
    model.set_experts_implementation(best)
    return best


def decode_hf(model, prompts, new_tokens):
    def run():
        model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0, eos_token_id=None)
    return run


def decode_skymoe(model, prompts, new_tokens):
    def run():
        generate(model, prompts, new_tokens)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions per measurement")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--decode-only", action="store_true", help="skip the training measurement")
    args = parser.parse_args()

    from transformers import MixtralForCausalLM

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = SkyworkMoeConfig.from_json_file(BENCH_CONFIG)
    ours = skymoe.build_model(config, dtype=dtype, seed=0)
    # Training computes with the fused native CPU kernels, as ``skymoe train`` does.
    ours.use_kernels(load_kernels(ours.device))
    with tempfile.TemporaryDirectory() as tmp:
        skymoe.save_model(ours, tmp)
        theirs = MixtralForCausalLM.from_pretrained(tmp, dtype=dtype)
    ours.train()
    theirs.train()

    ids = torch.randint(3, config.vocab_size, (args.batch, args.seq))
    results: dict[str, dict[str, float | str]] = {}

    hf_default = theirs.config._experts_implementation
    tokens = ids.numel()
    if not args.decode_only:
        impl = hf_train_impl(theirs, ids)
        compiled = copy.deepcopy(ours).compile_layers()
        t_eager, t_ours, t_hf = timed_alternating(
            [train_step(ours, ids, False), train_step(compiled, ids, False),
             train_step(theirs, ids, True)], args.steps)
        for name, t in (("train (compiled layers)", t_ours), ("train (eager)", t_eager)):
            results[name] = {"skymoe": tokens / t, "hf": tokens / t_hf, "unit": "tokens/s",
                             "hf_impl": impl}
        del compiled

    # Inference uses skymoe's inference path: native decode kernels on CPU (a no-op elsewhere).
    ours = prepare(ours)
    theirs.eval()
    theirs.set_experts_implementation(hf_default)
    new = 32
    for batch in (1, 16):
        prompts = torch.randint(3, config.vocab_size, (batch, 64))
        with torch.inference_mode():
            t_o, t_h, t_o1, t_h1 = timed_alternating(
                [decode_skymoe(ours, prompts, new), decode_hf(theirs, prompts, new),
                 decode_skymoe(ours, prompts, 1), decode_hf(theirs, prompts, 1)], args.steps)
        results[f"decode batch {batch}"] = {"skymoe": batch * new / t_o, "hf": batch * new / t_h,
                                            "unit": "new tokens/s, prefill included",
                                            "hf_impl": hf_default}
        # The 31 steps after the first token: generate(32) minus generate(1) (prefill + 1).
        results[f"decode-only batch {batch}"] = {
            "skymoe": batch * (new - 1) / (t_o - t_o1), "hf": batch * (new - 1) / (t_h - t_h1),
            "unit": "new tokens/s, decode steps only", "hf_impl": hf_default}

    if not args.decode_only:
        peak = matmul_flops(dtype)
        achieved = 3 * flops_per_token(config, args.seq) * tokens / t_ours
        results["fwd+bwd FLOP/s"] = {"skymoe": achieved, "matmul": peak,
                                     "fraction": achieved / peak, "unit": "FLOP/s"}

    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}")
    print(f"{'measurement':<24} {'skymoe':>12} {'transformers':>13} {'ratio':>7}  unit (HF experts impl)")
    for name, r in results.items():
        if name == "fwd+bwd FLOP/s":
            continue
        print(f"{name:<24} {r['skymoe']:>12.1f} {r['hf']:>13.1f} "
              f"{r['skymoe'] / r['hf']:>6.2f}x  {r['unit']} ({r['hf_impl']})")
    r = results.get("fwd+bwd FLOP/s")
    if r:
        print(f"skymoe fwd+bwd {r['skymoe'] / 1e9:.1f} GFLOP/s = {r['fraction']:.1%} of a "
              f"{args.dtype} 2048^3 matmul ({r['matmul'] / 1e9:.1f} GFLOP/s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
