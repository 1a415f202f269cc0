"""Fine-tuning: SFT samples and their loss masks, packing that keeps samples apart, and LoRA
runs of the trainer (only adapters train; checkpoints hold them and resume exactly)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from skymoe.checkpoint import load_model, load_tokenizer
from skymoe.checkpoint.chat_template import TEMPLATE_FILE, ChatTemplate
from skymoe.checkpoint.dcp import ShardedCheckpoint
from skymoe.errors import ConfigError
from skymoe.model.loss import IGNORE_INDEX
from skymoe.train import sft
from skymoe.train.batch import Batch
from skymoe.train.trainer import Trainer

from test_train import WORDS, _config


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A little trained model's checkpoint (an HF directory with its tokenizer): the base."""
    tmp = tmp_path_factory.mktemp("base")
    trainer = Trainer(_config(tmp, "pretrain", train={"steps": 2, "checkpoint_every": 2,
                                                      "eval_every": 0, "sample_tokens": 0}),
                      quiet=True)
    trainer.run()
    trainer.close()
    return tmp / "pretrain" / "checkpoints" / "step-00000002"


def _pairs(path: Path, n: int = 48) -> Path:
    """Prompt/completion pairs: a word list, and the same words reversed."""
    gen = torch.Generator().manual_seed(1)
    with path.open("w") as f:
        for _ in range(n):
            n_words = int(torch.randint(2, 6, (), generator=gen))
            words = [WORDS[i] for i in torch.randint(len(WORDS), (n_words,), generator=gen)]
            f.write(json.dumps({"prompt": " ".join(words) + " ->",
                                "completion": " " + " ".join(reversed(words))}) + "\n")
    return path


# ------------------------------------------------------------------------------ SFT samples
def test_prompt_completion_labels_match_a_hand_computed_example(base):
    tok = load_tokenizer(base)
    template = ChatTemplate.load(base)
    got = sft.encode_record({"prompt": "alpha beta ->", "completion": " beta alpha"}, "x:1",
                            tok, template)
    prompt, answer = tok.encode("alpha beta ->"), tok.encode(" beta alpha", add_bos=False)
    assert got.ids == prompt + answer + [tok.eos_id]
    assert got.labels == [IGNORE_INDEX] * len(prompt) + answer + [tok.eos_id]
    everything = sft.encode_record({"prompt": "alpha beta ->", "completion": " beta alpha"},
                                   "x:1", tok, template, loss_on="all")
    assert everything.labels == got.ids


def test_chat_labels_cover_the_assistant_turns_only(base):
    tok = load_tokenizer(base)
    template = ChatTemplate.load(base)  # the base has none: the ChatML default
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ciao"}]
    got = sft.encode_record({"messages": messages}, "x:1", tok, template)
    # The default template's text, written out by hand, in its trained and untrained parts.
    parts = [("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
              "<|im_start|>assistant\n", False), ("hello<|im_end|>\n", True),
             ("<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n", False),
             ("ciao<|im_end|>\n", True)]
    ids, labels = [], []
    for text, trained in parts:
        piece = tok.encode(text, add_bos=not ids)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    assert got.ids == ids + [tok.eos_id]
    assert got.labels == labels + [tok.eos_id]


def test_too_long_samples_are_truncated_or_dropped_and_counted(base, tmp_path):
    tok, template = load_tokenizer(base), ChatTemplate.load(base)
    pairs = _pairs(tmp_path / "pairs.jsonl", 24)
    lengths = [len(sft.encode_record(json.loads(line), "", tok, template).ids)
               for line in pairs.read_text().splitlines()]
    limit = sorted(lengths)[len(lengths) // 2]
    kept, stats = sft.encode_samples([pairs], tok, template, limit, too_long="drop")
    assert stats.dropped_too_long == sum(n > limit for n in lengths) > 0
    assert len(kept) == sum(n <= limit for n in lengths)
    cut, stats = sft.encode_samples([pairs], tok, template, limit)
    assert stats.truncated == sum(n > limit for n in lengths)
    assert max(len(s.ids) for s in cut) == limit


def test_bad_lines_are_named_or_skipped(base, tmp_path):
    tok, template = load_tokenizer(base), ChatTemplate.load(base)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": " b"}\n{"text": "no"}\n{broken\n')
    with pytest.raises(Exception, match=r"bad.jsonl:2"):
        sft.encode_samples([bad], tok, template, 32)
    samples, stats = sft.encode_samples([bad], tok, template, 32, skip_bad=True)
    assert len(samples) == 1 and len(stats.skipped_examples) == 2


# ---------------------------------------------------------------------------------- packing
def _ce_sum(model, batch: Batch) -> torch.Tensor:
    logits = model(batch.input_ids, position_ids=batch.position_ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                           batch.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def test_packed_rows_give_the_loss_and_gradients_of_their_samples_alone(base):
    model = load_model(base, dtype=torch.float32).eval()  # dropless routing
    gen = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    samples = []
    for n in (5, 9, 3, 7, 6, 4):
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        labels = [IGNORE_INDEX] * 2 + ids[2:]
        samples.append(sft.Sample(ids, labels))
    rows = sft.SftRows(samples, 16, pad_id=2, pack=True)
    assert len(rows) < len(samples)  # several samples share a row

    def loss_and_grads(batches):
        model.zero_grad()
        loss = sum(_ce_sum(model, b) for b in batches)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}

    packed_loss, packed = loss_and_grads([rows.read(range(len(rows)))])
    alone = [Batch(torch.tensor([s.ids]), torch.tensor([[IGNORE_INDEX] + s.labels[1:]]))
             for s in samples]
    want_loss, want = loss_and_grads(alone)
    torch.testing.assert_close(packed_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert packed.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(packed[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_isolated_documents_restart_positions_and_skip_the_first_label():
    eos = 2
    batch = Batch.isolated_documents(torch.tensor([[5, 6, 2, 7, 8, 9, 2, 4]]), eos)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert batch.labels.tolist() == [[-100, 6, 2, -100, 8, 9, 2, -100]]


# ------------------------------------------------------------------------------ LoRA runs
def _lora_config(tmp_path: Path, base: Path, run: str, **train):
    return _config(tmp_path, run,
                   model={"init_from": str(base), "overrides": {}},
                   data={"format": "sft", "sources": [str(_pairs(tmp_path / "pairs.jsonl"))],
                         "seq_len": 32, "val_fraction": 0.1},
                   train={"precision": "fp32", "steps": 4, "batch_size": 4,
                          "micro_batch_size": 2, "lr": 1e-2, "checkpoint_every": 2,
                          "keep_last": 0, "eval_every": 2, "sample_tokens": 0, **train},
                   lora={"enabled": True, "rank": 4, "alpha": 8, "base_dtype": "fp32",
                         "train_router": True})


def test_lora_run_trains_only_the_adapters_and_resumes_exactly(tmp_path, base):
    trainer = Trainer(_lora_config(tmp_path, base, "lora"), quiet=True)
    trainer.run()
    params = dict(trainer.model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    assert trained and all(".lora." in n or ".gate." in n for n in trained)
    assert {n for n, p in params.items() if p.requires_grad} == {
        n for n, p in params.items() if p in trainer.optimizer.state}
    original = dict(load_model(base, dtype=torch.float32).named_parameters())
    for name, p in params.items():
        if name in trained:
            if name.endswith(".B") or ".gate." in name:  # B starts at zero; the router moves
                assert not torch.equal(p, original.get(name, torch.zeros_like(p))), name
        else:
            assert torch.equal(p, original[name]), name
    trainer.close()

    run = tmp_path / "lora"
    step2 = run / "checkpoints" / "step-00000002"
    keys = set(ShardedCheckpoint(step2 / "sharded").shapes())
    assert keys and all(".lora." in k or ".gate." in k or k.endswith("expert_bias")
                        or k.startswith("optimizer.") for k in keys)
    assert (step2 / TEMPLATE_FILE).is_file()  # the template the run trained with travels

    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "checkpoints" / "step-00000004")
    resumed = Trainer(_lora_config(tmp_path, base, "again"), resume=True, quiet=True)
    resumed.run()
    resumed.close()
    assert _train_losses(again) == _train_losses(run)
    final = "checkpoints/step-00000004/sharded"
    a, b = ShardedCheckpoint(run / final), ShardedCheckpoint(again / final)
    for key in a.shapes():
        assert torch.equal(a.read([key])[key], b.read([key])[key]), key


def test_lora_needs_a_base_and_matching_precision(tmp_path, base):
    cfg = _lora_config(tmp_path, base, "x")
    cfg.model.init_from = ""
    with pytest.raises(ConfigError, match="init_from"):
        cfg.validate()
    cfg = _lora_config(tmp_path, base, "x")
    cfg.lora.base_dtype = "bf16"
    with pytest.raises(ConfigError, match="precision"):
        cfg.validate()


def test_packed_sft_loss_falls_on_the_pairs(tmp_path, base):
    """Full fine-tuning (no LoRA) on packed pairs: the held-out loss falls."""
    cfg = _lora_config(tmp_path, base, "full", steps=8, eval_every=8)
    cfg.lora.enabled = False
    trainer = Trainer(cfg, quiet=True)
    before = trainer.evaluate()
    summary = trainer.run()
    trainer.close()
    assert summary.val_loss < before



@pytest.mark.parametrize("layout", [("parallel.dp=2",), ("parallel.pp=2",),
                                    ("parallel.tp=2", "parallel.expert=edp"),
                                    ("parallel.tp=2", "parallel.expert=etp")])
def test_lora_under_parallel_layouts_matches_one_process(tmp_path, base, layout):
    """LoRA fine-tuning (one sample per row, loss on the answers) under DP 2 (adapters
    replicated, their AdamW states under ZeRO-1), a 2-stage pipeline, EDP and ETP (adapters
    cut like their base weights over TP and the experts): the losses of one process, and the
    adapter exported from the sharded checkpoint equals one process's."""
    from safetensors.torch import load_file

    from skymoe.export import export_checkpoint
    from test_parallel_train import TOLERANCE, _torchrun

    def config(run):
        cfg = _lora_config(tmp_path, base, run, eval_every=0)
        cfg.data.pack = False
        return cfg

    reference = Trainer(config("one"), quiet=True)
    reference.run()
    reference.close()
    config("layout").save(tmp_path / "layout.toml")
    _torchrun(tmp_path / "layout.toml", 2, *(a for kv in layout for a in ("--set", kv)))
    want = _train_losses(tmp_path / "one")
    got = _train_losses(tmp_path / "layout")
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=TOLERANCE), step
    adapters = [load_file(export_checkpoint(tmp_path / run, tmp_path / f"{run}-adapter")
                          / "adapter_model.safetensors") for run in ("one", "layout")]
    assert adapters[1].keys() == adapters[0].keys()
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def _train_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.mark.parametrize("base_dtype", ["bf16", "fp8"])
def test_lora_on_a_bf16_or_fp8_base_trains_the_adapters_only(tmp_path, base, base_dtype):
    from skymoe.model.fp8 import Fp8Experts, Fp8Linear
    from skymoe.quantize import quantize_checkpoint

    start = base
    if base_dtype == "fp8":
        start = quantize_checkpoint(base, tmp_path / "fp8")
    cfg = _lora_config(tmp_path, start, "run", precision="bf16", steps=3, eval_every=3,
                       checkpoint_every=0)
    cfg.lora.base_dtype = base_dtype
    trainer = Trainer(cfg, quiet=True)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if not p.requires_grad}
    summary = trainer.run()
    trainer.close()
    assert summary.val_loss is not None and torch.isfinite(torch.tensor(summary.val_loss))
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in frozen.items())
    assert all(p.dtype == torch.float32 for n, p in params.items() if p.requires_grad)
    if base_dtype == "fp8":  # the base's projections keep their one-byte values
        fp8 = [m for m in trainer.model.modules() if isinstance(m, (Fp8Linear, Fp8Experts))]
        assert fp8 and all(t.dtype == torch.float8_e4m3fn for m in fp8
                           for t in m.buffers() if t.element_size() == 1)
    else:
        assert all(p.dtype == torch.bfloat16 for n, p in params.items()
                   if not p.requires_grad and p.dim() == 2)
    # The checkpoint holds what trains, not the frozen base (an FP8 base's values are buffers).
    saved = ShardedCheckpoint(trainer.last_checkpoint / "sharded").shapes()
    held = [k.removeprefix("optimizer.exp_avg_sq.").removeprefix("optimizer.exp_avg.")
            for k in saved]
    assert held and all(".lora." in k or ".gate." in k or k.endswith(".expert_bias")
                        for k in held), sorted(held)


def test_an_fp8_base_must_be_an_fp8_checkpoint(tmp_path, base):
    cfg = _lora_config(tmp_path, base, "run", precision="bf16")
    cfg.lora.base_dtype = "fp8"
    with pytest.raises(ConfigError, match="FP8 checkpoint"):
        Trainer(cfg, quiet=True)


def test_a_lora_run_exports_an_adapter_that_merges_and_loads_with_the_same_logits(
        tmp_path, base):
    """export -> adapter dir (with the run's chat template); merge -> a checkpoint whose
    logits equal the base with the adapter applied; generate --adapter runs it."""
    import subprocess
    import sys

    from skymoe.checkpoint.adapter import load_adapter
    from skymoe.export import export_checkpoint
    from skymoe.merge import merge_adapter

    trainer = Trainer(_lora_config(tmp_path, base, "run", eval_every=0), quiet=True)
    trainer.run()
    trainer.close()
    adapter = export_checkpoint(tmp_path / "run", tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file() and (adapter / TEMPLATE_FILE).is_file()
    assert not (adapter / "config.json").exists()
    with pytest.raises(Exception, match="already exists"):
        export_checkpoint(tmp_path / "run", adapter)

    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with_adapter = load_model(base, dtype=torch.float32).eval()
    load_adapter(with_adapter, adapter, with_adapter.config.model_type)
    plain = load_model(base, dtype=torch.float32).eval()
    merged = load_model(merge_adapter(base, adapter, tmp_path / "merged"),
                        dtype=torch.float32).eval()
    with torch.no_grad():
        want = with_adapter(ids).logits
        assert not torch.allclose(plain(ids).logits, want, atol=1e-4)  # the adapter matters
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "merged" / TEMPLATE_FILE).is_file()

    fp8 = merge_adapter(base, adapter, tmp_path / "merged-fp8", to_fp8=True)
    assert "quantization_config" in json.loads((fp8 / "config.json").read_text())

    out = subprocess.run([sys.executable, "-m", "skymoe", "generate", str(base), "--adapter",
                          str(adapter), "--prompt", "alpha beta ->", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("alpha beta ->")


def test_the_embedded_example_asks_for_documented_functions_and_answers_with_their_code():
    import ast
    import itertools

    from skymoe.train.sft_example import stdlib_samples

    samples = list(itertools.islice(stdlib_samples(max_chars=300), 200))
    assert len(samples) == 200 and samples == list(stdlib_samples(max_chars=300, limit=200))
    for s in samples:
        user, assistant = s["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        (fn,) = ast.parse(assistant["content"]).body
        assert isinstance(fn, ast.FunctionDef) and f"`{fn.name}`" in user["content"]
        assert ast.get_docstring(fn) is None and len(assistant["content"]) <= 300


def test_a_fine_tune_starts_from_a_run_directory_and_measures_the_base_first(tmp_path, base):
    run_dir = base.parent.parent  # the pre-training run whose checkpoint is the base
    cfg = _lora_config(tmp_path, run_dir, "ft", steps=2, eval_every=2, checkpoint_every=0)
    trainer = Trainer(cfg, quiet=True)
    assert Path(trainer.cfg.model.init_from) == base
    trainer.run()
    answer = trainer.sample("alpha beta ->", max_new_tokens=3)
    trainer.close()
    val = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text()
           .splitlines() if '"val"' in line]
    assert [r["step"] for r in val] == [0, 2]
    assert isinstance(answer, str) and "alpha beta" not in answer  # the answer alone


def test_serve_takes_the_chat_template_from_a_fine_tuned_adapter(tmp_path, base):
    import argparse

    from skymoe.cli import flags

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    args = argparse.Namespace(model=str(base), adapter=str(adapter))
    assert flags.template_dir(args) == str(base)  # an adapter without a template
    ChatTemplate.load(base).save(adapter)
    assert flags.template_dir(args) == str(adapter)
    assert flags.template_dir(argparse.Namespace(model=str(base), adapter=None)) == str(base)
