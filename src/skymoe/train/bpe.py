"""Train a byte-level BPE tokenizer on a corpus and save it where ``load_tokenizer`` finds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from ..checkpoint.tokenizer import BYTE_SPECIALS, Tokenizer, load_tokenizer
from ..errors import DataError

# <pad>, <s>, </s> + the 256 byte symbols, plus a few merges: smaller would not be BPE at all.
MIN_VOCAB_SIZE = len(BYTE_SPECIALS) + 256 + 3


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids on ``texts`` and save it to ``out_dir``.

    Ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>``; every byte has an id, so any text round-trips.
    Writes ``tokenizer.json`` and ``tokenizer_config.json`` and returns the tokenizer loaded
    back from them. The same texts give the same ``tokenizer.json``.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at "
                        f"least {MIN_VOCAB_SIZE} (3 specials + 256 bytes + merges)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=list(BYTE_SPECIALS),
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False)
    seen = [0]
    tok.train_from_iterator(_count_nonempty(texts, seen), trainer=trainer)
    if seen[0] == 0:
        raise DataError("cannot train a tokenizer on an empty corpus; give it some text")
    # Same BOS convention as the byte-level tokenizer that `skymoe init` writes.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BYTE_SPECIALS.index("<s>"))])

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "add_bos_token": True}, indent=2) + "\n")
    return load_tokenizer(d)  # proves the files on disk are loadable


def _count_nonempty(texts: Iterable[str], seen: list[int]) -> Iterator[str]:
    """Pass texts through, counting the non-empty ones (``texts`` may be a one-shot generator)."""
    for text in texts:
        if text:
            seen[0] += 1
            yield text
