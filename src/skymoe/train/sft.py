"""Supervised fine-tuning data: chat conversations and prompt/completion pairs as training rows
with loss masks, packed with isolation or one sample per row.

Input is JSONL, one sample per line, either

- ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``
  (OpenAI's shape), rendered with the chat template (``skymoe.checkpoint.chat_template``: the
  tokenizer's own, else the documented ChatML default; the server renders requests the same
  way), or
- ``{"prompt": "...", "completion": "..."}``: the two texts one after the other.

Each sample ends with EOS. With ``loss_on = "completion"`` (default) only the assistant turns'
tokens (the text each assistant message adds to the rendered conversation, its end-of-turn
marker included) and the final EOS are trained: every other label is -100. ``"all"`` trains
every token. The pieces are tokenized one by one, so the mask boundaries are exact and an
assistant turn is tokenized as the model will generate it (from the start of its turn).

A sample longer than ``seq_len`` is truncated (its first ``seq_len`` tokens) or dropped by
setting, and counted; one left without a trained token is dropped. Packing puts consecutive
samples into a row while they fit; ``position_ids`` restart at 0 for each sample, so the model
keeps attention within each (``skymoe.model.layers.packed_causal_mask``) and a packed row's
loss and gradients are those of its samples alone. The rest of a row is padding (EOS, not
trained, a sequence of its own).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..checkpoint.chat_template import ChatRenderError, ChatTemplate
from ..checkpoint.tokenizer import Tokenizer
from ..errors import DataError
from ..model.loss import IGNORE_INDEX
from .batch import Batch
from .sources import corpus_files

LOSS_ON = ("completion", "all")
TOO_LONG = ("truncate", "drop")


@dataclass
class Sample:
    """One tokenized sample: ``ids`` and ``labels`` (-100 where no loss is taken)."""

    ids: list[int]
    labels: list[int]


@dataclass
class SftStats:
    """What encoding a set of samples did."""

    samples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_untrained: int = 0
    trained_tokens: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def iter_lines(sources: Sequence[str | Path]) -> Iterator[tuple[str, bytes]]:
    """(``file:line``, line) of every non-empty line of the sources (JSONL files, or
    directories of ``*.jsonl``)."""
    for source in sources:
        for path in corpus_files(Path(source), ("*.jsonl",)):
            try:
                f = open(path, "rb")
            except OSError as exc:
                raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
            with f:
                for number, raw in enumerate(f, 1):
                    if raw.strip():
                        yield f"{path}:{number}", raw


def parse_record(raw: bytes, where: str) -> dict[str, Any]:
    """One JSONL line as a JSON object; anything else is a ``DataError`` naming ``where``."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not a JSON object ({exc})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: not a JSON object")
    return record


def encode_record(record: dict[str, Any], where: str, tokenizer: Tokenizer,
                  template: ChatTemplate, loss_on: str = "completion") -> Sample:
    """The sample of one record (see the module docstring); a record of neither shape, or
    one the template cannot render, is a ``DataError`` naming ``where``."""
    if "messages" in record:
        pieces = _chat_pieces(record["messages"], where, template)
        add_bos = template.add_bos
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: prompt and completion must be strings")
        pieces, add_bos = [(prompt, False), (completion, True)], None
    else:
        raise DataError(f"{where}: expected 'messages' (a chat) or 'prompt' and 'completion'; "
                        f"found keys {sorted(record)[:8]}")
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        if not text:
            continue
        piece = tokenizer.encode(text, add_bos=False if ids else add_bos)  # BOS opens a sample
        ids += piece
        labels += piece if trained or loss_on == "all" else [IGNORE_INDEX] * len(piece)
    ids.append(tokenizer.eos_id)
    labels.append(tokenizer.eos_id)
    return Sample(ids, labels)


def _chat_pieces(messages: Any, where: str, template: ChatTemplate
                 ) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is an assistant turn) pieces, up to the last
    assistant message: each assistant turn is what its message adds to the rendering of the
    conversation before it with the generation prompt."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise DataError(f"{where}: messages must be a list of {{'role': str, 'content': str}}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{where}: no assistant message to train on")
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    pieces, done = [], ""
    try:
        for i in turns:
            prompt = template.render(msgs[:i], add_generation_prompt=True)
            full = template.render(msgs[:i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError(f"{where}: the chat template does not render the conversation "
                                "as a growing prefix, so assistant turns cannot be masked")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
    except ChatRenderError as exc:
        raise DataError(f"{where}: {exc}") from None
    return pieces


def encode_samples(sources: Sequence[str | Path], tokenizer: Tokenizer,
                   template: ChatTemplate, seq_len: int, loss_on: str = "completion",
                   too_long: str = "truncate", skip_bad: bool = False
                   ) -> tuple[list[Sample], SftStats]:
    """Every sample of the sources, fitted to ``seq_len`` (see the module docstring)."""
    if loss_on not in LOSS_ON:
        raise DataError(f"loss_on = {loss_on!r}; use one of {LOSS_ON}")
    if too_long not in TOO_LONG:
        raise DataError(f"too_long = {too_long!r}; use one of {TOO_LONG}")
    stats = SftStats()
    samples = []
    for where, raw in iter_lines(sources):
        try:
            sample = encode_record(parse_record(raw, where), where, tokenizer, template,
                                   loss_on)
        except DataError as exc:
            if not skip_bad:
                raise
            stats.skipped_examples.append(str(exc))
            continue
        if len(sample.ids) > seq_len:
            if too_long == "drop":
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            sample = Sample(sample.ids[:seq_len], sample.labels[:seq_len])
        trained = sum(label != IGNORE_INDEX for label in sample.labels[1:])
        if not trained:
            stats.dropped_untrained += 1
            continue
        stats.trained_tokens += trained
        samples.append(sample)
    stats.samples = len(samples)
    if not samples:
        raise DataError(f"no usable fine-tuning sample in {', '.join(map(str, sources))}")
    return samples, stats


class SftRows:
    """Fine-tuning rows of ``seq_len`` tokens: one sample per row, or packed (see the module
    docstring). Read like ``TokenRows``, as ``Batch`` objects."""

    def __init__(self, samples: Sequence[Sample], seq_len: int, pad_id: int,
                 pack: bool = True) -> None:
        rows: list[list[Sample]] = []
        for s in samples:
            if pack and rows and sum(len(x.ids) for x in rows[-1]) + len(s.ids) <= seq_len:
                rows[-1].append(s)
            else:
                rows.append([s])
        n = len(rows)
        self.seq_len, self.packed = seq_len, pack
        self.ids = torch.full((n, seq_len), pad_id, dtype=torch.int32)
        self.labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.int32)
        self.positions = torch.zeros((n, seq_len), dtype=torch.int32) if pack else None
        for r, row in enumerate(rows):
            at = 0
            for s in row:
                end = at + len(s.ids)
                self.ids[r, at:end] = torch.tensor(s.ids, dtype=torch.int32)
                self.labels[r, at:end] = torch.tensor(s.labels, dtype=torch.int32)
                self.labels[r, at] = IGNORE_INDEX  # never predicted from the sample before
                if pack:
                    self.positions[r, at:end] = torch.arange(len(s.ids), dtype=torch.int32)
                at = end
            if pack:  # the padding: a sequence of its own
                self.positions[r, at:] = torch.arange(seq_len - at, dtype=torch.int32)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def read(self, index: torch.Tensor | Sequence[int]) -> Batch:
        index = torch.as_tensor(index, dtype=torch.int64)
        return Batch(self.ids[index].long(), self.labels[index].long(),
                     self.positions[index].long() if self.positions is not None else None)

    def read_range(self, start: int, stop: int) -> Batch:
        return self.read(range(start, min(stop, len(self))))


def split_samples(samples: list[Sample], val_fraction: float, seed: int
                  ) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) samples: a seeded choice of ``round(val_fraction * n)`` samples
    (at least one when the fraction is positive, at most n - 1), in their original order."""
    n = len(samples)
    if val_fraction <= 0 or n < 2:
        return samples, []
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val].tolist())
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])


__all__ = ["LOSS_ON", "TOO_LONG", "Sample", "SftRows", "SftStats", "encode_record",
           "encode_samples", "iter_lines", "parse_record", "split_samples"]
