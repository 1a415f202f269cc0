"""The trainer end to end on a tiny model and corpus: gradient-accumulation invariance,
bit-exact resume, a clean stop on SIGINT, non-finite losses, and bad configs or data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skymoe.errors import ConfigError, TrainingError
from skymoe.train import run_state
from skymoe.train import config as train_config
from skymoe.train import step as step_ops
from skymoe.train.trainer import Trainer, lr_at

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "num_experts": [4],
              "max_position_embeddings": 128}
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()


def _corpus(directory: Path) -> Path:
    """A deterministic little corpus: 40 documents of pseudo-random words."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for d in range(40):
        ids = torch.randint(len(WORDS), (60,), generator=gen).tolist()
        (directory / f"doc{d:02d}.txt").write_text(" ".join(WORDS[i] for i in ids) + "\n")
    return directory


def _config(tmp_path: Path, run: str, **sections) -> train_config.TrainConfig:
    data = {
        "model": {"overrides": dict(TINY_MODEL)},
        "data": {"sources": [str(_corpus(tmp_path / "corpus"))], "seq_len": 16,
                 "val_fraction": 0.1},
        "tokenizer": {"vocab_size": 300},
        "train": {"steps": 6, "batch_size": 8, "micro_batch_size": 8, "warmup_steps": 2,
                  "lr": 3e-3, "min_lr": 3e-4, "eval_every": 3, "eval_batches": 2,
                  "checkpoint_every": 0, "sample_tokens": 4},
        # Fixed routing groups: the same gradients however a batch is split.
        "moe": {"capacity_factor": 1.0, "aux_coef": 0.01, "z_loss_coef": 0.001,
                "routing_group_size": 1},
        "run": {"dir": str(tmp_path / run)},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return train_config.from_dict(data)


def _losses(run_dir: Path) -> list[tuple[int, float, list[float]]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["moe"]["aux_coef"]) for r in rows if r["kind"] == "train"]


def test_gradient_accumulation_gives_the_same_gradients(tmp_path):
    """The same 8-sequence batch as 1 micro-batch or as 4 of 2: identical gradients, the aux
    and z-loss terms (with drops) included."""
    grads = {}
    for micro in (8, 2):
        trainer = Trainer(_config(tmp_path, f"run{micro}", train={"precision": "fp32",
                                                                   "micro_batch_size": micro},
                                  moe={"aux_coef": 0.5, "z_loss_coef": 0.01}), quiet=True)
        batch = trainer.loader.next_batch()
        trainer.accumulate_gradients(batch)
        assert sum(trainer.stats.summary()["drop_rate"]) > 0  # capacity is active
        grads[micro] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        # The aux terms matter: without them the router gradient is different.
        trainer.optimizer.zero_grad(set_to_none=True)
        step_ops.accumulate_gradients(trainer.steps, batch, None, trainer.dp, trainer.stats)
        gate = "model.layers.0.block_sparse_moe.gate.weight"
        assert not torch.allclose(trainer.model.get_parameter(gate).grad, grads[micro][gate])
    for name, g in grads[8].items():
        torch.testing.assert_close(grads[2][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    grads = []
    for recompute in (False, True):
        trainer = Trainer(_config(tmp_path, f"run{recompute}", train={
            "precision": "fp32", "activation_checkpointing": recompute}), quiet=True)
        trainer.accumulate_gradients(trainer.loader.next_batch())
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_is_bit_exact(tmp_path):
    full = Trainer(_config(tmp_path, "full"), quiet=True)
    full.run()
    half = Trainer(_config(tmp_path, "half", train={"steps": 3, "lr_decay_steps": 6}),
                   quiet=True)
    summary = half.run()
    assert summary.checkpoint.name == "step-00000003"
    # A run killed after logging steps 4 and 5 but before checkpointing them (the last line
    # torn): the resumed run redoes them, and the log keeps one record per step.
    full_lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines(keepends=True)
    redone = [ln for ln in full_lines if json.loads(ln)["step"] in (4, 5)]
    with open(tmp_path / "half" / "metrics.jsonl", "a") as log:
        log.writelines(redone + ['{"kind": "train", "step": 6, "lo'])
    # Resume the same way the CLI does: the run's saved config, with more steps.
    resumed_cfg = train_config.load(tmp_path / "half" / "config.toml", ["train.steps=6"])
    Trainer(resumed_cfg, resume=True, quiet=True).run()
    assert _losses(tmp_path / "half") == _losses(tmp_path / "full")  # bit-identical floats
    for a, b in zip(full.model.parameters(),
                    Trainer(resumed_cfg, resume=True, quiet=True).model.parameters()):
        assert torch.equal(a, b)


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    cfg = _config(tmp_path, "run", train={"steps": 100000, "eval_every": 0})
    cfg_path = tmp_path / "train.toml"
    cfg.save(cfg_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "skymoe", "train", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "--resume" in err
    steps = [s for s, _, _ in _losses(tmp_path / "run")]
    latest = run_state.latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == f"step-{steps[-1]:08d}"
    resumed = Trainer(train_config.load(tmp_path / "run" / "config.toml",
                                        [f"train.steps={steps[-1] + 1}"]),
                      resume=True, quiet=True)
    assert resumed.step == steps[-1]
    assert resumed.run().steps == steps[-1] + 1


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path):
    trainer = Trainer(_config(tmp_path, "run", train={"steps": 2}), quiet=True)
    trainer.run()
    good = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with torch.no_grad():
        trainer.model.model.norm.weight.fill_(float("nan"))
    trainer.cfg.train.steps = 4
    with pytest.raises(TrainingError, match="not finite.*step-00000002"):
        trainer.run()
    latest = run_state.latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-00000002"
    reloaded = Trainer(train_config.load(tmp_path / "run" / "config.toml"), resume=True,
                       quiet=True)
    for n, p in reloaded.model.named_parameters():
        assert torch.equal(p, good[n]), n
    # With skip_nonfinite the bad batches are skipped and the run goes on.
    with torch.no_grad():
        reloaded.model.model.norm.weight.fill_(float("nan"))
    reloaded.cfg.train.skip_nonfinite = True
    reloaded.cfg.train.steps = 3
    before = reloaded.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert reloaded.run().steps == 3
    assert torch.equal(reloaded.model.model.layers[0].self_attn.q_proj.weight, before)


def test_lr_schedule_by_hand(tmp_path):
    cfg = _config(tmp_path, "run", train={"steps": 12, "warmup_steps": 2, "lr": 1.0,
                                          "min_lr": 0.1})
    assert [lr_at(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, cfg) == pytest.approx(1.0)                 # cosine starts at the peak
    assert lr_at(7, cfg) == pytest.approx(0.55)                # half way: (1 + 0.1) / 2
    assert lr_at(12, cfg) == pytest.approx(0.1) == lr_at(50, cfg)


def test_run_dir_with_a_run_needs_resume(tmp_path):
    Trainer(_config(tmp_path, "run", train={"steps": 1}), quiet=True).run()
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(_config(tmp_path, "run"), quiet=True)
    with pytest.raises(TrainingError, match="no checkpoint"):
        Trainer(_config(tmp_path, "other"), resume=True, quiet=True)


@pytest.mark.parametrize("overrides, match", [
    (["train.nope=1"], "train.nope"),
    (["train.lr=fast"], "train.lr must be a float"),
    (["optim.lr=1"], r"unknown section \[optim\]"),
    (["train.batch_size=6", "train.micro_batch_size=4"], "multiple of train.micro_batch_size"),
    (["moe.drop_policy=random"], "moe.drop_policy"),
    (["train.lr"], "section.key=value"),
    (["train.compile=true", "train.activation_checkpointing=true"], "cannot be combined"),
    (["train.compile=true", "parallel.tp=2"], "does not work with parallel.tp > 1"),
    (["train.async_checkpoint=true", 'train.checkpoint_format="hf"'], "writes sharded"),
])
def test_config_errors_name_the_setting(overrides, match):
    with pytest.raises(ConfigError, match=match):
        train_config.load(None, overrides)


def test_config_file_round_trip_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlr = 1e-3\nsteps = 7\n[model.overrides]\nnum_hidden_layers = 3\n')
    cfg = train_config.load(path, ["train.steps=9", "model.overrides.moe_use_logits_norm=false",
                                   "run.dir=runs/x"])
    assert (cfg.train.lr, cfg.train.steps, cfg.run.dir) == (1e-3, 9, "runs/x")
    assert cfg.model.overrides == {"num_hidden_layers": 3, "moe_use_logits_norm": False}
    cfg.save(tmp_path / "saved.toml")
    assert train_config.load(tmp_path / "saved.toml") == cfg


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"\xff\xfe\x00bad", "UTF-8"),
])
def test_cli_bad_data_is_a_one_line_error(tmp_path, content, match):
    data = tmp_path / "corpus.txt"
    data.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "skymoe", "train", "--run-dir",
                           str(tmp_path / "run"), "--set", f"data.sources=['{data}']"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert match in lines[-1] and str(data) in lines[-1] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [
    ["init", "--config", "tiny", "{file}/sub"],
    ["train", "--run-dir", "{file}", "--steps", "1"],
    ["train", "--run-dir", "{file}/run", "--steps", "1"],
])
def test_cli_unusable_output_paths_are_one_line_errors(tmp_path, argv):
    file = tmp_path / "a-file"
    file.write_text("in the way")
    proc = subprocess.run([sys.executable, "-m", "skymoe", *(a.format(file=file) for a in argv)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"skymoe {argv[0]}: error: ") and str(file) in last
