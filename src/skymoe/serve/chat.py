"""The chat template for requests: ``skymoe.checkpoint.chat_template`` with its rendering
errors as HTTP 400s."""

from __future__ import annotations

from ..checkpoint.chat_template import (DEFAULT_STOP, DEFAULT_TEMPLATE, ChatRenderError,
                                        ChatTemplate)
from .protocol import bad_request


def render_chat(template: ChatTemplate, messages: list[dict[str, str]]) -> str:
    """The prompt text for ``messages``, ending with the assistant's turn; a 400 naming the
    field when the template cannot render them."""
    try:
        return template.render(messages)
    except ChatRenderError as exc:
        raise bad_request(str(exc), exc.param) from None


__all__ = ["DEFAULT_STOP", "DEFAULT_TEMPLATE", "ChatTemplate", "render_chat"]
