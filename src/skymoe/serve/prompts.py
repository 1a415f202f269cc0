"""A request's prompts as token ids, each checked against the served context as early as it
can be: a text that certainly cannot fit is refused before it is tokenized."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .chat import render_chat
from .protocol import APIError, ChatCompletionRequest, bad_request, message_text

if TYPE_CHECKING:
    from .app import ServerState


def check_prompt(state: ServerState, ids: list[int]) -> None:
    """A 400 if the prompt leaves no room for an output token."""
    limit = state.max_model_len
    if len(ids) >= limit:
        raise bad_request(f"the prompt has {len(ids)} tokens; this model's context is {limit} "
                          f"tokens, which must also hold at least one output token", "prompt")


def check_length(state: ServerState, ids: list[int], max_tokens: int | None,
                 param: str) -> int:
    """``max_tokens``, or all the context left when None; a 400 naming the limit if the
    prompt and the output do not fit."""
    limit = state.max_model_len
    check_prompt(state, ids)
    if max_tokens is None:
        return limit - len(ids)
    if len(ids) + max_tokens > limit:
        raise bad_request(f"{param} ({max_tokens}) + the prompt ({len(ids)} tokens) exceeds "
                          f"this model's context of {limit} tokens; ask for at most "
                          f"{limit - len(ids)}", param)
    return max_tokens


def _certainly_too_long(state: ServerState, text: str) -> bool:
    """True when ``text`` cannot fit the context whatever it tokenizes to, decided without
    tokenizing: no token covers more than ``max_token_bytes`` bytes, so ``text`` has at least
    bytes / max_token_bytes tokens. The factor 4 leaves room for normalizers that shorten text
    before tokenizing (Unicode composition); the exact check follows tokenization."""
    bound = 4 * state.tokenizer.max_token_bytes * state.max_model_len
    return len(text) > bound or len(text.encode("utf-8", "surrogatepass")) > bound


def _too_long(state: ServerState, what: str, param: str) -> APIError:
    return bad_request(f"{what} longer than this model's context of {state.max_model_len} "
                       "tokens", param)


def encode_prompts(state: ServerState, prompt: str | list[str] | list[int] | list[list[int]]
                   ) -> list[list[int]]:
    """Token ids of each prompt, each checked against the context as soon as it is known."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise bad_request(f"prompt {i} is empty; send at least one character", "prompt")
            if _certainly_too_long(state, item):
                raise _too_long(state, f"prompt {i} ({len(item)} characters) is", "prompt")
            ids = state.tokenizer.encode(item)
        else:
            ids = list(item)
            bad = [t for t in ids if not 0 <= t < state.vocab_size]
            if bad:
                raise bad_request(f"prompt {i}: token id {bad[0]} is outside the vocabulary "
                                  f"(0 to {state.vocab_size - 1})", "prompt")
        if not ids:
            raise bad_request(f"prompt {i} is empty (no tokens)", "prompt")
        check_prompt(state, ids)
        prompts.append(ids)
    return prompts


def encode_chat(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    """The messages rendered by the chat template and tokenized."""
    template = state.chat_template
    messages = [{"role": m.role, "content": message_text(m, i)}
                for i, m in enumerate(req.messages)]
    if _certainly_too_long(state, "".join(m["content"] for m in messages)):
        raise _too_long(state, "the messages are", "messages")
    ids = state.tokenizer.encode(render_chat(template, messages), add_bos=template.add_bos)
    if not ids:
        raise bad_request("the messages render to an empty prompt", "messages")
    return ids
