"""The embedded fine-tuning example: instruction pairs from the Python standard library.

Every machine that runs skymoe has the standard library's source, so the example needs nothing
downloaded: each top-level function or method with a docstring becomes a chat sample whose
user turn asks for the function (its name, module and the docstring's first paragraph) and
whose assistant turn is the function's code without the docstring (``ast.unparse``: one
formatting for all). Functions whose code is longer than ``max_chars`` are left out, so a
sample fits a small model's context. The files are read in sorted order: the same pairs on
every machine with the same Python.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path
from typing import Any, Iterator

from .sources import corpus_files, default_corpus_sources


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef]:
    """Top-level functions and methods of top-level classes, in source order."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, ast.FunctionDef))


def _sample(node: ast.FunctionDef, module: str, max_chars: int) -> dict[str, Any] | None:
    doc = ast.get_docstring(node)
    if not doc or len(node.body) < 2:  # nothing but the docstring
        return None
    summary = " ".join(doc.split("\n\n")[0].split())
    body = ast.FunctionDef(name=node.name, args=node.args, body=node.body[1:],
                           decorator_list=[], returns=node.returns, type_comment=None,
                           type_params=getattr(node, "type_params", []))
    code = ast.unparse(ast.fix_missing_locations(body))
    if len(code) > max_chars:
        return None
    question = f"Write the Python function `{node.name}` of module `{module}`: {summary}"
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": code}]}


def stdlib_samples(max_chars: int = 400, limit: int = 0) -> Iterator[dict[str, Any]]:
    """Chat samples (``{"messages": [...]}``) of the standard library's documented functions
    (see the module docstring); at most ``limit`` (0: all)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    for source in default_corpus_sources():
        for path in corpus_files(source, ["*.py"]):
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError):
                continue
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            for node in _functions(tree):
                sample = _sample(node, module, max_chars)
                if sample is not None:
                    yield sample
                    count += 1
                    if count == limit:
                        return


def write_samples(out: str | Path, max_chars: int = 400, limit: int = 0) -> int:
    """Write ``stdlib_samples`` to the JSONL file ``out``; returns how many."""
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for sample in stdlib_samples(max_chars, limit):
            f.write(json.dumps(sample) + "\n")
            n += 1
    return n


__all__ = ["stdlib_samples", "write_samples"]
