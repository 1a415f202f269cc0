"""Tokenizers from a checkpoint directory: ``tokenizer.json`` (HF tokenizers) or
``tokenizer.model`` (sentencepiece), plus a byte-level tokenizer that needs no files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import CheckpointError

BYTE_SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 as in Skywork/Llama configs
# Files of a checkpoint directory that belong to its tokenizer (copied along with the weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


class Tokenizer:
    """Text <-> token ids with the model's BOS/EOS conventions.

    ``max_token_bytes`` is the longest vocabulary entry in UTF-8 bytes (special tokens
    included): no token covers more text, so a text of ``n`` bytes has at least
    ``n / max_token_bytes`` tokens (before normalization), which bounds a prompt's length
    without tokenizing it."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 vocab_size: int, bos_id: int | None, eos_id: int | None, add_bos: bool,
                 source: str, max_token_bytes: int,
                 encode_batch: Callable[[list[str]], list[list[int]]] | None = None) -> None:
        self._encode, self._decode = encode, decode
        self._encode_batch = encode_batch or (lambda texts: [encode(t) for t in texts])
        self.vocab_size, self.bos_id, self.eos_id = vocab_size, bos_id, eos_id
        self.add_bos, self.source = add_bos, source
        self.max_token_bytes = max(1, max_token_bytes)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self._with_bos(self._encode(text), add_bos)

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
        """``encode`` of each text, by the tokenizer library's own (parallel) batch encoder."""
        return [self._with_bos(ids, add_bos) for ids in self._encode_batch(texts)]

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        if not want_bos and ids and ids[0] == self.bos_id:
            ids = ids[1:]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)


_CONTEXT = 5  # prompt tokens decoded along with the first output tokens (word-boundary spaces)


class TextStream:
    """Incremental detokenization of one generated sequence: ``push(token)`` returns the text
    that may be shown now, ``finish()`` the rest; ``text`` is the whole text, cut before the
    first stop string.

    Only the last few tokens are decoded per token (with a few prompt tokens for context, so
    word-boundary spaces come out right), an unfinished multi-byte character waits for its next
    byte, and text that could be the start of a stop string is held back, so a stop string is
    never shown and the streamed pieces add up to ``text``."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int],
                 stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self._ids = list(prompt_ids[-_CONTEXT:])
        self._prefix, self._read = 0, len(self._ids)
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self.tokenizer.decode(self._ids[self._prefix:self._read])
        after = self.tokenizer.decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped and self._read < len(self._ids):  # bytes of an unfinished char
            before = self.tokenizer.decode(self._ids[self._prefix:self._read])
            self.text += self.tokenizer.decode(self._ids[self._prefix:])[len(before):]
            self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            end = max(self.sent, len(self.text) - self._hold)
        out, self.sent = self.text[self.sent:end], end
        return out


def _special(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer saved in checkpoint directory ``path``.

    ``tokenizer.json`` is preferred; ``tokenizer.model`` (sentencepiece, as Skywork and Llama 2
    ship) is the fallback. BOS/EOS come from ``tokenizer_config.json``, else ``config.json``.
    """
    d = Path(path)
    tok_cfg = _read_json(d / "tokenizer_config.json")
    model_cfg = _read_json(d / "config.json")
    add_bos = bool(tok_cfg.get("add_bos_token", True))
    if (d / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer
        try:
            tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as exc:  # the Rust library raises a bare Exception
            raise CheckpointError(f"{d / 'tokenizer.json'}: cannot be loaded ({exc})") from None

        def ids_of(name: str | None, fallback_key: str) -> int | None:
            found = tok.token_to_id(name) if name else None
            return found if found is not None else _first_id(model_cfg.get(fallback_key))

        return Tokenizer(lambda s: tok.encode(s, add_special_tokens=True).ids,
                         lambda ids: tok.decode(ids, skip_special_tokens=True),
                         tok.get_vocab_size(), ids_of(_special(tok_cfg, "bos_token"), "bos_token_id"),
                         ids_of(_special(tok_cfg, "eos_token"), "eos_token_id"), add_bos,
                         str(d / "tokenizer.json"),
                         _longest(tok.get_vocab(with_added_tokens=True)),
                         # encode_batch_fast (tokenizers >= 0.20): the same ids without
                         # character offsets, which cost time and memory here.
                         lambda texts: [e.ids for e in getattr(
                             tok, "encode_batch_fast", tok.encode_batch)(
                                 texts, add_special_tokens=True)])
    if (d / "tokenizer.model").is_file():
        import sentencepiece as spm
        try:
            sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{d / 'tokenizer.model'}: cannot be loaded ({exc})") from None
        bos = sp.bos_id() if sp.bos_id() >= 0 else _first_id(model_cfg.get("bos_token_id"))
        eos = sp.eos_id() if sp.eos_id() >= 0 else _first_id(model_cfg.get("eos_token_id"))
        return Tokenizer(lambda s: sp.encode(s), lambda ids: sp.decode(ids), sp.get_piece_size(),
                         bos, eos, add_bos, str(d / "tokenizer.model"),
                         _longest(sp.id_to_piece(i) for i in range(sp.get_piece_size())),
                         lambda texts: sp.encode(texts))  # a list: sentencepiece's threads
    raise CheckpointError(f"{d}: no tokenizer.json or tokenizer.model; save a tokenizer with "
                          "the checkpoint (skymoe init writes a byte-level one)")


def _longest(pieces: Iterable[str]) -> int:
    # A piece's own spelling is never shorter in UTF-8 than the text it stands for: byte-level
    # BPE spells each byte with one (1- or 2-byte) character, sentencepiece spells a space as
    # the 3-byte "\u2581" and a fallback byte as "<0xNN>".
    return max((len(p.encode("utf-8")) for p in pieces), default=1)


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value if isinstance(value, int) else None


def save_byte_tokenizer(directory: str | Path) -> None:
    """Write a byte-level ``tokenizer.json`` (259 ids: <pad>, <s>, </s>, then the 256 bytes).

    Every text round-trips exactly; it needs no training data, so a freshly initialized model
    has a working tokenizer on a machine without downloads.
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(list(BYTE_SPECIALS))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "add_bos_token": True}, indent=2) + "\n")


BYTE_VOCAB_SIZE = len(BYTE_SPECIALS) + 256
