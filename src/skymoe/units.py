"""Sizes written by people: ``5GB``, ``500MB``, ``24GiB``."""

from __future__ import annotations

import math
import re

from .errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count, as bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m[2].upper() not in _UNITS or not math.isfinite(float(m[1])) or float(m[1]) <= 0:
        raise ConfigError(f"size {text!r}: use a number with an optional unit, e.g. 5GB or 500MB")
    return int(float(m[1]) * _UNITS[m[2].upper()])
