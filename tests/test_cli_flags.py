"""The CLI's shared flags mean one thing in every command, and the old spellings of the flags
that changed still work, with a deprecation warning on stderr."""

import argparse
import json

import pytest

from skymoe.checkpoint.fp8 import FP8_MODES
from skymoe.cli import build_parser, main
from skymoe.cli.flags import DTYPES, DeprecatedAlias


def _parsers(parser: argparse.ArgumentParser, name: str = "skymoe"):
    """Every (command name, parser), nested ones (``bench serve``) included."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _options(flag: str):
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if flag in action.option_strings:
                yield name, action


def test_every_help_renders_and_names_deprecated_spellings():
    for name, parser in _parsers(build_parser()):
        assert parser.format_help(), name
        for action in parser._actions:
            if isinstance(action, DeprecatedAlias):
                assert action.help.startswith("deprecated: use "), (name, action.option_strings)


def test_shared_flags_mean_one_thing():
    dtypes = [(name, a) for name, a in _options("--dtype") if not isinstance(a, DeprecatedAlias)]
    assert {name for name, _ in dtypes} == {
        "skymoe init", "skymoe generate", "skymoe serve", "skymoe eval", "skymoe bench generate",
        "skymoe export"}
    for name, action in dtypes:
        assert action.choices == list(DTYPES), name
        assert action.default == "auto" or "default " + action.default + ":" in action.help, name
    for name, action in _options("--fp8"):
        if not isinstance(action, DeprecatedAlias):
            assert tuple(action.choices) == FP8_MODES and action.default == "auto", name
    tps = list(_options("--tp"))
    assert {name for name, _ in tps} == {"skymoe generate", "skymoe serve",
                                         "skymoe plan pipeline"}
    for name, action in tps:
        assert action.type is int and action.default == 1, name
        assert action.help.startswith("tensor-parallel size"), name


def test_quantize_to_fp8_and_the_old_boolean(capsys):
    parser = build_parser()
    assert parser.parse_args(["quantize", "in", "out", "--to", "fp8"]).to == "fp8"
    assert capsys.readouterr().err == ""
    assert parser.parse_args(["quantize", "in", "out", "--fp8"]).to == "fp8"
    assert capsys.readouterr().err.startswith(
        "skymoe quantize: warning: --fp8 is deprecated; use --to fp8")
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["quantize", "in", "out"])
    assert exc.value.code == 2
    assert "one of the arguments --to --fp8 is required" in capsys.readouterr().err


def test_quantize_writes_the_same_checkpoint_either_way(tmp_path):
    assert main(["init", str(tmp_path / "bf16"), "--config", "tiny", "--dtype", "bfloat16"]) == 0
    assert main(["quantize", str(tmp_path / "bf16"), str(tmp_path / "new"), "--to", "fp8"]) == 0
    assert main(["quantize", str(tmp_path / "bf16"), str(tmp_path / "old"), "--fp8"]) == 0
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    for new in sorted((tmp_path / "new").iterdir()):
        assert new.read_bytes() == (tmp_path / "old" / new.name).read_bytes(), new.name


def test_plan_serve_model_positional_and_weight_dtype(capsys):
    args = ["--gpus", "8", "--gpu-mem", "24GiB"]
    assert main(["plan", "serve", "skywork-moe-base", *args, "--weight-dtype", "bf16"]) == 0
    new = capsys.readouterr()
    assert new.err == "" and "weights bf16" in new.out
    assert main(["plan", "serve", "--model", "skywork-moe-base", *args, "--dtype", "bf16"]) == 0
    old = capsys.readouterr()
    assert old.out == new.out
    assert old.err.splitlines() == [
        "skymoe plan serve: warning: --model is deprecated; use MODEL (the first argument)",
        "skymoe plan serve: warning: --dtype is deprecated; use --weight-dtype"]
    assert main(["plan", "serve", "--gpus", "8"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("skymoe plan serve: error: give MODEL")


def test_require_positive_names_the_flag(capsys):
    assert main(["bench", "generate", "tiny", "--max-batch", "0"]) == 2
    assert capsys.readouterr().err == (
        "skymoe bench generate: error: --max-batch must be >= 1, got 0\n")
