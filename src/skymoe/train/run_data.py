"""A run's tokenizer and data: the loader of its training rows, its held-out rows and the
tokenizer directory its checkpoints copy, from plain text (tokenized at start-up, with a
tokenizer trained for the run when none is given), from prepared token shards
(``data.prepared``) or from fine-tuning samples (``data.format = "sft"``)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..checkpoint import load_tokenizer
from ..checkpoint.chat_template import TEMPLATE_FILE, ChatTemplate
from ..checkpoint.tokenizer import TOKENIZER_FILES, Tokenizer
from ..errors import ConfigError, DataError
from . import data, sft, sources
from .bpe import train_bpe_tokenizer
from .config import TrainConfig
from .data import SequenceLoader
from .mixture import MixtureLoader
from .prepare import PreparedData, tokenizer_fingerprint
from .token_rows import TokenRows

Barrier = Callable[[], None]
Log = Callable[[str], None]


@dataclass
class RunData:
    """A run's tokenizer (and the directory checkpoints copy it from), the training loader,
    the held-out rows, and a line saying what was read."""

    tokenizer: Tokenizer
    tokenizer_dir: Path
    loader: SequenceLoader | MixtureLoader
    val_rows: TokenRows | sft.SftRows | None
    summary: str


def run_data(cfg: TrainConfig, run_dir: Path, is_main: bool, barrier: Barrier,
             log: Log) -> RunData:
    """The data ``cfg.data`` describes. ``barrier`` is taken by every process where the main
    one writes into ``run_dir`` (a trained tokenizer, a chat template) for the others to read;
    ``log`` hears about slow steps as they start."""
    if cfg.data.prepared:
        return prepared_data(cfg)
    if cfg.data.format == "sft":
        return sft_data(cfg, run_dir, is_main, barrier)
    return text_data(cfg, run_dir, is_main, barrier, log)


def text_data(cfg: TrainConfig, run_dir: Path, is_main: bool, barrier: Barrier,
              log: Log) -> RunData:
    """Plain-text documents (``data.sources``, by default the Python standard library
    source), split into training and held-out documents, tokenized and packed into rows."""
    d = cfg.data
    corpus = d.sources or sources.default_corpus_sources()
    patterns = d.patterns if d.sources else ["*.py"]
    names = ", ".join(map(str, corpus)) if d.sources else "the Python standard library source"
    log(f"reading corpus: {names}")
    docs = data.read_documents(corpus, patterns, d.text_field)
    if d.max_bytes:
        docs = _first_bytes(docs, d.max_bytes)
    train_docs, val_docs = data.split_documents(docs, d.val_fraction, cfg.train.seed)
    tok_dir = run_dir / "tokenizer"
    # A model to start from brings its own tokenizer (its embedding rows follow it).
    tok_path = cfg.tokenizer.path or cfg.model.init_from
    if tok_path:
        tokenizer = load_tokenizer(tok_path)
    else:
        # A resumed run has its own tokenizer; otherwise one process trains and saves it
        # and the others read what it wrote. Every rank takes the barrier: a rank that
        # looked for the file only after the main one wrote it must not skip it.
        if is_main and not (tok_dir / "tokenizer.json").is_file():
            log(f"training a byte-level BPE tokenizer (vocab {cfg.tokenizer.vocab_size})")
            train_bpe_tokenizer(train_docs, cfg.tokenizer.vocab_size, tok_dir)
        barrier()
        tokenizer = load_tokenizer(tok_dir)
    tokenizer_dir = Path(tok_path) if tok_path else tok_dir
    if tokenizer.eos_id is None:
        raise ConfigError(f"{tokenizer_dir}: the tokenizer has no EOS token, needed between "
                          "packed documents")
    train_seqs = data.pack_documents(data.tokenize_documents(tokenizer, train_docs),
                                     d.seq_len, tokenizer.eos_id)
    val_rows = (TokenRows.from_tensor(data.pack_documents(
        data.tokenize_documents(tokenizer, val_docs), d.seq_len, tokenizer.eos_id))
        if val_docs else None)
    return RunData(tokenizer, tokenizer_dir,
                   data.SequenceLoader(train_seqs, cfg.train.batch_size, cfg.train.seed),
                   val_rows,
                   f"corpus: {len(train_docs)} training documents -> {train_seqs.shape[0]} "
                   f"sequences of {d.seq_len} tokens; {len(val_docs)} held out")


def prepared_data(cfg: TrainConfig) -> RunData:
    """Memory-mapped token shards (``data.prepared``), mixed by ``data.weights``."""
    d = cfg.data
    prepared = [PreparedData(p) for p in d.prepared]
    # The run's tokenizer: the configured one, the starting model's, or the data's own.
    tok_path = Path(cfg.tokenizer.path or cfg.model.init_from or prepared[0].tokenizer_dir)
    tokenizer = load_tokenizer(tok_path)
    fingerprint = tokenizer_fingerprint(tok_path)
    for p in prepared:
        if p.fingerprint != fingerprint:
            raise ConfigError(
                f"{p.directory}: prepared with another tokenizer "
                f"({p.meta['tokenizer']['source']}) than this run's ({tok_path}); prepare "
                f"it again with --tokenizer {tok_path}, or train with its tokenizer")
    train = [p.rows("train", d.seq_len) for p in prepared]
    for p, rows in zip(prepared, train):
        if not len(rows):
            raise DataError(f"{p.directory}: {p.tokens('train')} training tokens, fewer "
                            f"than data.seq_len = {d.seq_len}")
    if len(train) == 1 and not d.weights:
        loader = data.SequenceLoader(train[0], cfg.train.batch_size, cfg.train.seed)
    else:
        loader = MixtureLoader(train, d.weights or [r.tokens for r in train],
                               cfg.train.batch_size, cfg.train.seed)
    val = TokenRows([s for p in prepared for s in p.rows("val", d.seq_len).segments],
                    d.seq_len)
    return RunData(tokenizer, tok_path, loader, val if len(val) else None,
                   f"prepared data: {', '.join(map(str, d.prepared))}: "
                   f"{sum(map(len, train))} training sequences of {d.seq_len} tokens, "
                   f"{len(val)} validation sequences")


def sft_data(cfg: TrainConfig, run_dir: Path, is_main: bool,
             barrier: Callable[[], None]) -> RunData:
    """The data of ``data.format = "sft"`` (chats or prompt/completion pairs, see
    ``train.sft``). The run's tokenizer directory gets the chat template the samples were
    rendered with (the base's, or the default), so every checkpoint of the run is served
    with the template it was trained on; the main process writes it, every process waits."""
    d = cfg.data
    source = cfg.tokenizer.path or cfg.model.init_from
    if not source:
        raise ConfigError("data.format = 'sft' fine-tunes a model with its tokenizer: set "
                          "model.init_from (or tokenizer.path)")
    tokenizer = load_tokenizer(source)
    if tokenizer.eos_id is None:
        raise ConfigError(f"{source}: the tokenizer has no EOS token, which ends every "
                          "fine-tuning sample")
    template = ChatTemplate.load(source)
    tok_dir = run_dir / "tokenizer"
    if is_main:
        tok_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if name != TEMPLATE_FILE and (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, tok_dir / name)
        template.save(tok_dir)
    barrier()
    samples, stats = sft.encode_samples(d.sources, tokenizer, template, d.seq_len, d.loss_on,
                                        d.too_long, d.skip_bad)
    train, val = sft.split_samples(samples, d.val_fraction, cfg.train.seed)
    rows = sft.SftRows(train, d.seq_len, tokenizer.eos_id, d.pack)
    skipped = f", {len(stats.skipped_examples)} bad lines skipped" if d.skip_bad else ""
    summary = (f"fine-tuning data: {stats.samples} samples ({len(train)} train, {len(val)} "
               f"held out) in {len(rows)} rows of {d.seq_len} tokens"
               f"{' (packed)' if d.pack else ''}; {stats.trained_tokens} trained tokens; "
               f"{stats.truncated} truncated, {stats.dropped_too_long} dropped as too long, "
               f"{stats.dropped_untrained} without an answer token{skipped}; chat template: "
               f"{template.origin}")
    return RunData(tokenizer, tok_dir,
                   SequenceLoader(rows, cfg.train.batch_size, cfg.train.seed),
                   sft.SftRows(val, d.seq_len, tokenizer.eos_id, d.pack) if val else None,
                   summary)


def _first_bytes(docs: list[str], limit: int) -> list[str]:
    """The leading documents whose UTF-8 size fits in ``limit`` bytes (at least one)."""
    kept, size = [], 0
    for doc in docs:
        size += len(doc.encode())
        if kept and size > limit:
            break
        kept.append(doc)
    return kept


__all__ = ["RunData", "prepared_data", "run_data", "sft_data", "text_data"]
