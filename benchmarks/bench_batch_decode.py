"""Batch decode: skymoe bf16 and FP8 vs transformers' bf16 ``generate``, 16 sequences at once.

The shared "bench" config (random weights, seed 0) as an HF Mixtral checkpoint, and its FP8
checkpoint (``skymoe quantize``). Each side prefills 16 prompts of 64 tokens, then decodes 32
greedy tokens for all 16 at once; reported: decode tokens/s (16 x 32 over the decode time) and
that rate as a fraction of the streaming ceiling (the weight bytes one step of 16 tokens reads,
``bench_llamacpp.decode_step_bytes``, at the rate a plain ``torch.sum`` reads them in the same
run). skymoe runs as ``skymoe generate`` does (``prepare``: native kernels); transformers runs
``MixtralForCausalLM.generate`` (greedy, KV cache), its decode time being the time of 33
generated tokens minus that of 1 (the prefill). Rounds alternate between the sides; medians.

Usage: python benchmarks/bench_batch_decode.py [--work DIR] [--rounds 3] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

# This directory: run as a script.
from bench_llamacpp import Skymoe as PreparedSkymoe, decode_step_bytes, streaming_rate

PROMPT_LEN, NEW_TOKENS = 64, 32


def checkpoints(work: Path) -> tuple[Path, Path]:
    """The bench model in bf16 and as FP8 (kept between runs)."""
    from skymoe.checkpoint import save_model
    from skymoe.config import resolve_config
    from skymoe.model.transformer import build_model
    from skymoe.quantize import quantize_checkpoint

    bf16, fp8 = work / "bf16", work / "fp8"
    if not (bf16 / "config.json").is_file():
        save_model(build_model(resolve_config("bench"), seed=0, dtype=torch.bfloat16), bf16,
                   model_type="mixtral")
    if not (fp8 / "config.json").is_file():
        quantize_checkpoint(bf16, fp8, show_progress=False)
    return bf16, fp8


class Skymoe(PreparedSkymoe):
    """The model as ``skymoe generate`` prepares it, decoding a batch."""

    @torch.inference_mode()
    def decode_seconds(self, prompts: torch.Tensor) -> float:
        model = self.model
        cache = model.new_kv_cache(prompts.shape[0], PROMPT_LEN + NEW_TOKENS)
        step = model(prompts, cache=cache, last_only=True).logits[:, -1].argmax(-1,
                                                                                 keepdim=True)
        began = time.perf_counter()
        for _ in range(NEW_TOKENS):
            step = model(step, cache=cache, last_only=True).logits[:, -1].argmax(-1,
                                                                                 keepdim=True)
        return time.perf_counter() - began


class Transformers:
    def __init__(self, checkpoint: Path) -> None:
        from transformers import MixtralForCausalLM

        self.model = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()

    @torch.inference_mode()
    def _generate(self, prompts: torch.Tensor, tokens: int) -> float:
        began = time.perf_counter()
        self.model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                            max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
        return time.perf_counter() - began

    def decode_seconds(self, prompts: torch.Tensor) -> float:
        return self._generate(prompts, NEW_TOKENS + 1) - self._generate(prompts, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-batch-decode"),
                        help="checkpoints, kept between runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    from skymoe.config import SkyworkMoeConfig

    bf16, fp8 = checkpoints(args.work)
    sides = {"skymoe bf16": Skymoe(bf16), "skymoe FP8": Skymoe(fp8),
             "skymoe FP8+head": Skymoe(fp8, fp8_lm_head=True),
             "transformers bf16": Transformers(bf16)}
    prompts = torch.randint(3, 32000, (args.batch, PROMPT_LEN),
                            generator=torch.Generator().manual_seed(0))
    for side in sides.values():  # warm-up
        side.decode_seconds(prompts)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            seconds[name].append(side.decode_seconds(prompts))
    config = SkyworkMoeConfig.from_json_file(bf16)
    step_bytes = {"skymoe bf16": decode_step_bytes(config, 2, batch=args.batch),
                  "skymoe FP8": decode_step_bytes(config, 1, batch=args.batch),
                  "skymoe FP8+head": decode_step_bytes(config, 1, 1, batch=args.batch),
                  "transformers bf16": decode_step_bytes(config, 2, batch=args.batch)}
    bandwidth = streaming_rate(max(step_bytes.values()))
    rates = {name: args.batch * NEW_TOKENS / statistics.median(s)
             for name, s in seconds.items()}
    print(f"bench config, batch {args.batch}, {PROMPT_LEN}-token prompts, {NEW_TOKENS} greedy "
          f"tokens each, {torch.get_num_threads()} threads, torch {torch.__version__}; medians "
          f"of {args.rounds} alternating rounds; plain read {bandwidth / 1e9:.1f} GB/s")
    print(f"{'side':18} {'decode tok/s':>13} {'step MB':>8} {'ceiling tok/s':>14} "
          f"{'of ceiling':>11}")
    for name, rate in rates.items():
        ceiling = args.batch * bandwidth / step_bytes[name]
        print(f"{name:18} {rate:13.1f} {step_bytes[name] / 1e6:8.1f} {ceiling:14.1f} "
              f"{rate / ceiling:10.0%}")
    for ours in ("skymoe FP8", "skymoe FP8+head"):
        print(f"{ours} / transformers bf16: {rates[ours] / rates['transformers bf16']:.2f}x; "
              f"/ skymoe bf16: {rates[ours] / rates['skymoe bf16']:.2f}x")


if __name__ == "__main__":
    main()
