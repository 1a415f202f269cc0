"""The ``skymoe`` command: one entry point with subcommands.

One module per command group, each registering its own subparsers; handlers parse, call the
library and print:

- ``info``: ``info``, ``init``
- ``generate``: ``generate``, ``bench generate``
- ``serve``: ``serve``, ``bench serve``
- ``train``: ``train``, ``plot``
- ``data``: ``data prepare``
- ``convert``: ``upcycle``, ``quantize``, ``export``
- ``evaluate``: ``eval``
- ``plan``: ``plan serve``, ``plan pipeline``
- ``flags``: the flags several commands share, defined once (its docstring records which
  spellings changed for consistency; the old ones still work, with a warning)

Every subcommand validates its input and reports a bad one (a ``SkymoeError``, a file-system
failure) as a single line on stderr with exit code 2 (1 for a failure while running);
tracebacks are reserved for bugs.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import SkymoeError, describe_os_error
from . import convert, data, evaluate, generate, info, plan, serve, train
from .flags import UsageError

__all__ = ["UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each parsed namespace's ``func`` runs it."""
    parser = argparse.ArgumentParser(
        prog="skymoe", description="Skywork-MoE models: inspect, create and run them.")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (info, generate, serve, train, data, convert, evaluate):
        module.register(top)
    bench = top.add_parser("bench", help="benchmarks (generate, serve)",
                           description="Throughput benchmarks of skymoe itself.")
    bench_commands = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    generate.register_bench(bench_commands)
    serve.register_bench(bench_commands)
    planners = top.add_parser("plan", help="plan a deployment (pipeline, serve)",
                              description="Planners computed from a model config alone.")
    plan.register(planners.add_subparsers(dest="what", required=True, metavar="WHAT"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    # "skymoe plan serve", as argparse's own errors and the deprecation warnings name it
    command = " ".join(filter(None, ("skymoe", args.command, getattr(args, "what", None))))
    try:
        code = args.func(args)
    except SkymoeError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable path, a file in the way, a full disk
        print(f"{command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    return code or 0
