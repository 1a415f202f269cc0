"""Turning generated tokens into response text and logprobs.

``TextStream`` detokenizes one sequence incrementally (only the last few tokens are decoded
per token, and an unfinished multi-byte character waits for its next byte) and holds back the
text that could be the start of a stop string, so a streamed stop string never reaches the
client and the streamed text equals the non-streamed text.
"""

from __future__ import annotations

import math
from typing import Any

from ..checkpoint.tokenizer import Tokenizer
from ..infer.engine import TokenLogprobs

_CONTEXT = 5  # prompt tokens decoded along with the first output tokens (word-boundary spaces)
_FLOOR = -9999.0  # JSON has no -inf; what the client sees for an impossible token


class TextStream:
    """The text of one sequence as its tokens arrive: ``push(token)`` returns the text that
    may be sent now, ``finish()`` the rest; ``text`` is the whole text (cut before the first
    stop string)."""

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


def _num(x: float) -> float:
    return x if math.isfinite(x) else _FLOOR


class LogprobFormatter:
    """OpenAI logprob objects; token strings are each token decoded alone."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion(self, entries: list[tuple[int, TokenLogprobs | None]],
                   offset: int) -> dict[str, Any]:
        """``/v1/completions`` form: parallel lists of tokens, their logprobs, top-k dicts and
        character offsets (starting at ``offset``); ``entries`` are (token id, logprobs or None
        for the first prompt token)."""
        tokens, logprobs, tops, offsets = [], [], [], []
        for token_id, lp in entries:
            text = self.token(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            logprobs.append(None if lp is None else _num(lp.logprob))
            tops.append(None if lp is None else
                        {self.token(t): _num(v) for t, v in lp.top})
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
                "text_offset": offsets}

    def chat(self, entries: list[TokenLogprobs]) -> dict[str, Any]:
        """``/v1/chat/completions`` form: ``{"content": [{token, logprob, bytes,
        top_logprobs}]}``."""
        def item(token_id: int, value: float) -> dict[str, Any]:
            text = self.token(token_id)
            return {"token": text, "logprob": _num(value), "bytes": list(text.encode())}

        return {"content": [{**item(lp.token_id, lp.logprob),
                             "top_logprobs": [item(t, v) for t, v in lp.top]}
                            for lp in entries], "refusal": None}
