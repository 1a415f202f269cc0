"""Randomized tensor-parallel inference: random small models, prompts and batch sizes, under the
layout ``skymoe generate --tp N`` and ``skymoe serve --tp N`` use (TP = ETP = N, heads split
unevenly, the vocabulary padded to a multiple of 24). For N = 2 and 3, ``generate`` on a random
batch and the continuous-batching engine on random requests (random prompt lengths, output
lengths, batch and prefill limits) give the greedy tokens of one process. The engine runs as
``serve --tp`` runs it: rank 0's ``EngineLoop`` takes requests that arrive at random moments
and broadcasts them each step, the other ranks step with it in ``run_worker``.

A token differs from one process only where the two best logits of the one-process model lie
within ``TIE`` (a reordered sum decides such a tie either way); those are counted, not failed.
CI runs a fixed seeded sample; ``--fuzz-cases N`` (env ``SKYMOE_FUZZ_CASES``) runs N cases per
TP size, from ``--fuzz-seed S``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from skymoe.config import SkyworkMoeConfig
from skymoe.infer.engine import Engine, Request
from skymoe.infer.generate import generate
from skymoe.model.transformer import build_model
from skymoe.parallel.apply import parallelize
from skymoe.parallel.layout import ParallelLayout
from skymoe.parallel.mesh import build_mesh
from skymoe.parallel.placement import VOCAB_MULTIPLE
from skymoe.serve.engine_thread import EngineLoop, Lockstep, run_worker

from distributed import spawn

TIMEOUT_S = 30
TIE = 1e-4
CI_SEEDS = [0, 1, 2]


@dataclass
class InferenceCase:
    seed: int
    config: SkyworkMoeConfig
    prompts: torch.Tensor          # a batch for generate [B, T]
    new_tokens: int
    requests: list[list[int]]      # prompts for the engine
    max_tokens: list[int]
    max_batch: int
    max_prefill_tokens: int
    gaps_s: list[float]            # pauses between the engine requests' arrivals

    def describe(self) -> str:
        c = self.config
        return (f"case seed={self.seed}: layers={c.num_hidden_layers} experts={c.num_experts} "
                f"top_k={c.num_experts_per_tok} heads={c.num_attention_heads}/"
                f"{c.num_key_value_heads} hidden={c.hidden_size} ffn={c.intermediate_size} "
                f"vocab={c.vocab_size} generate batch={tuple(self.prompts.shape)} "
                f"new={self.new_tokens} engine requests={len(self.requests)} "
                f"max_batch={self.max_batch} max_prefill={self.max_prefill_tokens}")


def draw_inference_case(seed: int, tp: int) -> InferenceCase:
    rng = random.Random(seed)
    kv_heads = rng.randint(tp, 5)
    heads = kv_heads * rng.choice([1, 2])
    experts = rng.randint(2, 8)
    config = SkyworkMoeConfig(
        vocab_size=rng.randrange(33, 301, 2), hidden_size=heads * rng.choice([4, 8]),
        intermediate_size=rng.randint(tp, 40), num_hidden_layers=rng.randint(1, 3),
        num_attention_heads=heads, num_key_value_heads=kv_heads, num_experts=experts,
        num_experts_per_tok=rng.randint(1, min(2, experts)),
        moe_expert_interval=rng.choice([1, 2]), moe_use_logits_norm=rng.random() < 0.5,
        tie_word_embeddings=rng.random() < 0.3, max_position_embeddings=128,
        torch_dtype="float32")
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, config.vocab_size,
                            (rng.randint(1, 6), rng.randint(1, 40)), generator=gen)
    count = rng.randint(1, 12)
    requests = [torch.randint(0, config.vocab_size, (rng.randint(1, 60),),
                              generator=gen).tolist() for _ in range(count)]
    return InferenceCase(seed, config, prompts, rng.randint(1, 24), requests,
                         [rng.randint(1, 20) for _ in range(count)], rng.randint(1, 8),
                         rng.choice([8, 32, 2048]),
                         [rng.choice([0.0, 0.0, 0.01, 0.05]) for _ in range(count)])


def _engine(model: torch.nn.Module, case: InferenceCase) -> Engine:
    return Engine(model, None, max_batch=case.max_batch, max_len=80,
                  max_prefill_tokens=case.max_prefill_tokens)


def _one_process_engine(model: torch.nn.Module, case: InferenceCase) -> dict[str, list[int]]:
    engine = _engine(model, case)
    for i, (prompt, n) in enumerate(zip(case.requests, case.max_tokens)):
        engine.submit(Request(prompt, n, request_id=f"r{i}"))
    return {c.request_id: c.token_ids for c in engine.run()}


def _lockstep_engine(model: torch.nn.Module, case: InferenceCase) -> dict[str, list[int]]:
    """Rank 0 of ``serve --tp``: requests arrive one by one with the case's pauses while the
    loop steps; returns each request's tokens."""
    loop = EngineLoop(_engine(model, case), lockstep=Lockstep())
    loop.start()

    async def client() -> dict[str, list[int]]:
        events: asyncio.Queue = asyncio.Queue()
        for i, (prompt, n) in enumerate(zip(case.requests, case.max_tokens)):
            await loop.submit([Request(prompt, n, request_id=f"r{i}")], events,
                              time.perf_counter())
            await asyncio.sleep(case.gaps_s[i])
        done: dict[str, list[int]] = {}
        while len(done) < len(case.requests):
            event = await events.get()
            if event.completion is not None:
                done[event.completion.request_id] = event.completion.token_ids
        return done

    try:
        return asyncio.run(client())
    finally:
        loop.stop()


@torch.no_grad()
def _differences(full: torch.nn.Module, prompt: list[int], want: list[int],
                 got: list[int]) -> tuple[int, list[str]]:
    """(1 if the first differing token is a near-tie of the one-process model, the
    differences that are not)."""
    if want == got:
        return 0, []
    i = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), None)
    if i is None:
        return 0, [f"lengths {len(got)} != {len(want)}"]
    logits = full(torch.tensor([prompt + want[:i]])).logits[0, -1]
    if abs(float(logits[want[i]] - logits[got[i]])) < TIE:
        return 1, []
    return 0, [f"token {i}: {got[i]} != {want[i]} (logits {float(logits[got[i]]):.5f} vs "
               f"{float(logits[want[i]]):.5f})"]


def _worker(rank: int, world: int, seeds: list[int], out: str) -> None:
    mesh = build_mesh(ParallelLayout(tp=world, etp=world))
    failures: list[str] = []
    ties = tokens = 0
    for seed in seeds:
        case = draw_inference_case(seed, world)
        full = build_model(case.config, seed=seed, dtype=torch.float32).eval()
        sharded = copy.deepcopy(full)
        parallelize(sharded, mesh, gather_logits=True, vocab_multiple=VOCAB_MULTIPLE)
        try:
            with torch.no_grad():
                want = generate(full, case.prompts, case.new_tokens).tolist()
                got = generate(sharded, case.prompts, case.new_tokens).tolist()
            want_engine = _one_process_engine(full, case)
            if rank == 0:
                got_engine = _lockstep_engine(sharded, case)
            else:
                run_worker(_engine(sharded, case), Lockstep())
        except Exception as exc:
            raise RuntimeError(f"{case.describe()}: {type(exc).__name__}: {exc}") from exc
        if rank:
            continue
        pairs = [(row, want[b], got[b], f"generate row {b}")
                 for b, row in enumerate(case.prompts.tolist())]
        pairs += [(prompt, want_engine[f"r{i}"], got_engine.get(f"r{i}", []), f"engine r{i}")
                  for i, prompt in enumerate(case.requests)]
        for prompt, w, g, where in pairs:
            tie, problems = _differences(full, prompt, w, g)
            ties, tokens = ties + tie, tokens + len(w)
            failures += [f"{case.describe()}: {where}: {p}" for p in problems]
    if rank == 0:
        Path(out).write_text(json.dumps({"cases": len(seeds), "tokens": tokens, "ties": ties,
                                         "failures": failures}))


@pytest.mark.parametrize("tp", [2, 3])
def test_random_tensor_parallel_inference_matches_one_process(tp, tmp_path, fuzz_cases,
                                                              fuzz_seed):
    seeds = CI_SEEDS if fuzz_cases is None else list(range(fuzz_seed, fuzz_seed + fuzz_cases))
    out = tmp_path / "report.json"
    spawn(_worker, tp, seeds, str(out), timeout_s=TIMEOUT_S)
    report = json.loads(out.read_text())
    print(f"\nTP {tp} inference fuzz, seeds {seeds[0]}..{seeds[-1]}: {report['cases']} cases, "
          f"{report['tokens']} tokens compared, {report['ties']} near-ties, "
          f"{len(report['failures'])} failures")
    assert report["tokens"] > 0
    assert not report["failures"], "\n".join(report["failures"][:20])
