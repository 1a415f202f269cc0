"""OpenAI logprob objects from generated tokens (the text itself streams through
``skymoe.checkpoint.tokenizer.TextStream`` in the engine)."""

from __future__ import annotations

import math
from typing import Any

from ..checkpoint.tokenizer import Tokenizer
from ..infer.engine import TokenLogprobs

_FLOOR = -9999.0  # JSON has no -inf; what the client sees for an impossible token


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
