"""Command-line options of the test suite."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("skymoe")
    group.addoption("--fuzz-cases", type=int, default=None,
                    help="random cases for the layout fuzz tests (default: the CI sample; "
                         "env SKYMOE_FUZZ_CASES)")
    group.addoption("--fuzz-seed", type=int, default=None,
                    help="first seed of the layout fuzz cases (default: 0; env SKYMOE_FUZZ_SEED)")


def _int_option(config: pytest.Config, name: str, env: str) -> int | None:
    value = config.getoption(name)
    if value is None and os.environ.get(env):
        value = int(os.environ[env])
    return value


@pytest.fixture
def fuzz_cases(pytestconfig: pytest.Config) -> int | None:
    """``--fuzz-cases`` / SKYMOE_FUZZ_CASES: None runs the CI sample."""
    return _int_option(pytestconfig, "--fuzz-cases", "SKYMOE_FUZZ_CASES")


@pytest.fixture
def fuzz_seed(pytestconfig: pytest.Config) -> int:
    """``--fuzz-seed`` / SKYMOE_FUZZ_SEED: the first seed of a longer fuzz run."""
    return _int_option(pytestconfig, "--fuzz-seed", "SKYMOE_FUZZ_SEED") or 0
