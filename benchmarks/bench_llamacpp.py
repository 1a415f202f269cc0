"""skymoe vs llama.cpp (through llama-cpp-python) on the shared "bench" config, same weights,
in bf16 and in 8 bits: skymoe on its own FP8 checkpoint (``skymoe quantize``, one byte per
projection weight; also with ``--fp8-lm-head``, the LM head in FP8 too) and llama.cpp's Q8_0
(``llama_model_quantize`` of the bf16 GGUF, its output matrix in Q8_0 too).

The bench model (random weights, seed 0) is saved as an HF Mixtral checkpoint with a
sentencepiece ``tokenizer.model`` (vocabulary 32000, trained on the Python standard library,
what a fresh machine has), converted to GGUF bf16 with llama.cpp's own
``convert_hf_to_gguf.py`` (shipped in the llama-cpp-python sdist), and every side runs the same
64-token prompt on the same threads:

- prefill: the prompt through the model into an empty KV cache (tokens/s);
- decode at batch 1: 32 greedy tokens one at a time after the prompt (new tokens/s).

Rounds alternate between the sides; medians reported. Each decode rate is also given as a
fraction of its streaming ceiling: the weight bytes one decode step reads (attention, the
router, the top-k experts of each layer, the LM head), divided into the rate at which a plain
``torch.sum`` reads that many bytes, measured in the same run.

Set-up (llama-cpp-python builds llama.cpp from source, a few minutes):
    pip download llama-cpp-python --no-deps --no-binary :all: -d /tmp/llcpp
    pip install /tmp/llcpp/llama_cpp_python-*.tar.gz
    tar xzf /tmp/llcpp/llama_cpp_python-*.tar.gz -C /tmp
Usage: python benchmarks/bench_llamacpp.py --llama-cpp-src /tmp/llama_cpp_python-X.Y.Z
           [--work DIR] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from skymoe.infer.generate import SamplingParams, sample_next

GREEDY = SamplingParams()

PROMPT_LEN, NEW_TOKENS = 64, 32


def build_checkpoint(directory: Path) -> None:
    """The bench model and a sentencepiece tokenizer in ``directory`` (kept between runs)."""
    import sentencepiece as spm

    from skymoe.checkpoint import save_model
    from skymoe.config import resolve_config
    from skymoe.model.transformer import build_model
    from skymoe.train.data import read_documents
    from skymoe.train.sources import default_corpus_sources

    if (directory / "tokenizer.model").is_file() and (directory / "config.json").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    model = build_model(resolve_config("bench"), seed=0, dtype=torch.bfloat16)
    save_model(model, directory)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(read_documents(default_corpus_sources(), ["*.py"], "text")))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=32000,
        model_type="bpe", byte_fallback=True, input_sentence_size=300000,
        shuffle_input_sentence=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        max_sentence_length=8192, num_threads=os.cpu_count() or 1)
    corpus.unlink()


def quantize_q8_0(gguf: Path, out: Path, threads: int) -> None:
    """llama.cpp's Q8_0 of the bf16 GGUF (kept between runs)."""
    import llama_cpp

    if out.is_file():
        return
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(gguf).encode(), str(out).encode(), params) != 0:
        sys.exit(f"llama_model_quantize failed for {gguf}")


def decode_step_bytes(config, projection_bytes: float, head_bytes: float = 2,
                      batch: int = 1) -> int:
    """Weight bytes one decode step of ``batch`` tokens reads: each layer's attention
    projections and the experts its tokens pick (top-k of one token; for a batch the expected
    number of distinct experts under uniform routing, E (1 - (1 - k/E)^batch)) or its dense
    MLP, at ``projection_bytes`` per weight, its fp32 router and bf16 norms, and the LM head at
    ``head_bytes`` per weight (bf16 in the FP8 convention too)."""
    c = config
    h, heads, kv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    attention = h * c.head_size * (2 * heads + 2 * kv)
    e, k = c.num_experts, c.num_experts_per_tok
    experts = e * (1 - (1 - k / e) ** batch) if batch > 1 else k
    total = 0.0
    for i in range(c.num_hidden_layers):
        ffn = 3 * h * c.intermediate_size * (experts if c.is_moe_layer(i) else 1)
        router = 4 * e * h if c.is_moe_layer(i) else 0
        total += (attention + ffn) * projection_bytes + router + 2 * 2 * h
    return int(total + head_bytes * c.vocab_size * h + 2 * h)


def streaming_rate(nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of a plain ``torch.sum`` over a bf16 buffer of ``nbytes`` (best of
    ``repeats``)."""
    buffer = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats + 1):
        began = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - began)
    return nbytes / best


def convert(checkpoint: Path, llama_src: Path, gguf: Path) -> None:
    """GGUF bf16 of ``checkpoint`` with llama.cpp's converter (kept between runs)."""
    if gguf.is_file():
        return
    root = llama_src / "vendor" / "llama.cpp"
    env = {**os.environ, "PYTHONPATH": str(root / "gguf-py")}
    subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(checkpoint),
                    "--outfile", str(gguf), "--outtype", "bf16"], check=True, env=env,
                   stdout=subprocess.DEVNULL)


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=PROMPT_LEN + NEW_TOKENS + 8,
                         n_batch=PROMPT_LEN, n_threads=threads, n_threads_batch=threads,
                         verbose=False)

    def run(self, prompt: list[int]) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        began = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - began
        began = time.perf_counter()
        for _ in range(NEW_TOKENS):
            llm.eval([int(np.argmax(self._last_logits()))])
        return prefill, time.perf_counter() - began

    def _last_logits(self) -> np.ndarray:
        # The logits of the last evaluated token (llama-cpp-python keeps no copy of them
        # without logits_all, which would run the LM head on every prompt position).
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm.ctx),
                                     shape=(self.llm.n_vocab(),))


class Skymoe:
    """What ``skymoe generate`` runs: the fastest CPU path available (native decode kernels)."""

    def __init__(self, checkpoint: Path, fp8_lm_head: bool = False) -> None:
        from skymoe.checkpoint import load_model
        from skymoe.infer.prepare import prepare
        from skymoe.model.fp8 import quantize_lm_head

        model = load_model(checkpoint, dtype=torch.bfloat16)
        if fp8_lm_head:  # skymoe generate --fp8-lm-head
            quantize_lm_head(model)
        self.model = prepare(model)

    @torch.inference_mode()
    def run(self, prompt: list[int]) -> tuple[float, float]:
        model = self.model
        cache = model.new_kv_cache(1, PROMPT_LEN + NEW_TOKENS)
        ids = torch.tensor([prompt])
        began = time.perf_counter()
        logits = model(ids, cache=cache, last_only=True).logits
        prefill = time.perf_counter() - began
        began = time.perf_counter()
        for _ in range(NEW_TOKENS):
            greedy = sample_next(logits[:, -1], GREEDY)
            logits = model(greedy[:, None], cache=cache, last_only=True).logits
        return prefill, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp-src", type=Path, required=True,
                        help="the unpacked llama-cpp-python sdist (has vendor/llama.cpp)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-llamacpp"),
                        help="checkpoint and GGUF, kept between runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint, gguf = args.work / "bench", args.work / "bench-bf16.gguf"
    build_checkpoint(checkpoint)
    convert(checkpoint, args.llama_cpp_src, gguf)
    q8_0 = args.work / "bench-q8_0.gguf"
    quantize_q8_0(gguf, q8_0, args.threads)
    fp8 = args.work / "bench-fp8"
    if not (fp8 / "config.json").is_file():
        from skymoe.quantize import quantize_checkpoint
        quantize_checkpoint(checkpoint, fp8, show_progress=False)
    import llama_cpp

    from skymoe.config import SkyworkMoeConfig

    sides = {"skymoe bf16": Skymoe(checkpoint), "skymoe FP8": Skymoe(fp8),
             "skymoe FP8+head": Skymoe(fp8, fp8_lm_head=True),
             "llama.cpp bf16": LlamaCpp(gguf, args.threads),
             "llama.cpp Q8_0": LlamaCpp(q8_0, args.threads)}
    prompt = torch.randint(3, 32000, (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    for side in sides.values():  # warm-up
        side.run(prompt)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            times[name].append(side.run(prompt))
    rates = {name: (PROMPT_LEN / statistics.median(t[0] for t in runs),
                    NEW_TOKENS / statistics.median(t[1] for t in runs))
             for name, runs in times.items()}
    config = SkyworkMoeConfig.from_json_file(checkpoint)
    # llama.cpp's Q8_0 stores 34 bytes per 32 weights, its LM head included.
    step_bytes = {"skymoe bf16": decode_step_bytes(config, 2),
                  "skymoe FP8": decode_step_bytes(config, 1),
                  "skymoe FP8+head": decode_step_bytes(config, 1, 1),
                  "llama.cpp bf16": decode_step_bytes(config, 2),
                  "llama.cpp Q8_0": decode_step_bytes(config, 34 / 32, 34 / 32)}
    bandwidth = streaming_rate(max(step_bytes.values()))
    print(f"bench config, {PROMPT_LEN}-token prompt, {NEW_TOKENS} greedy tokens, "
          f"{args.threads} threads; torch {torch.__version__}, llama-cpp-python "
          f"{llama_cpp.__version__}; medians of {args.rounds} alternating rounds; plain read "
          f"{bandwidth / 1e9:.1f} GB/s")
    print(f"{'side':16} {'prefill tok/s':>14} {'decode tok/s':>13} {'step MB':>8} "
          f"{'ceiling tok/s':>14} {'of ceiling':>11}")
    for name, (prefill, decode) in rates.items():
        ceiling = bandwidth / step_bytes[name]
        print(f"{name:16} {prefill:14.1f} {decode:13.1f} {step_bytes[name] / 1e6:8.1f} "
              f"{ceiling:14.1f} {decode / ceiling:10.0%}")
    for ours, theirs in (("skymoe bf16", "llama.cpp bf16"), ("skymoe FP8", "skymoe bf16"),
                         ("skymoe FP8", "llama.cpp Q8_0"), ("skymoe FP8+head", "skymoe bf16"),
                         ("skymoe FP8+head", "llama.cpp Q8_0")):
        print(f"{ours} / {theirs}: prefill {rates[ours][0] / rates[theirs][0]:.2f}x, "
              f"decode {rates[ours][1] / rates[theirs][1]:.2f}x")

if __name__ == "__main__":
    main()
