"""Chat templates: the tokenizer's own (Jinja2, as Hugging Face tokenizers ship them) or a
documented ChatML default; the one rendering the server and fine-tuning data share.

The template comes from ``chat_template.jinja`` or ``tokenizer_config.json``'s
``chat_template`` (a string, or a list of named templates of which ``default`` is used) in the
checkpoint directory. It is rendered in a sandbox with ``messages``,
``add_generation_prompt=True``, ``bos_token`` and ``eos_token``, like transformers'
``apply_chat_template``. Such a template writes its own special tokens, so its text is encoded
without adding BOS. Without one, the ChatML default below is used, and its end-of-turn marker
``<|im_end|>`` is a stop string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_STOP = ("<|im_end|>",)
ROLES = ("system", "developer", "user", "assistant")
TEMPLATE_FILE = "chat_template.jinja"


class ChatRenderError(ValueError):
    """Messages the template cannot render: ``param`` names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ChatTemplate:
    """A compiled chat template. ``add_bos``: whether the tokenizer adds BOS to the rendered
    text (only for the default template); ``stop``: stop strings implied by the template."""

    source: str
    template: Any
    bos_token: str
    eos_token: str
    add_bos: bool
    stop: tuple[str, ...]
    origin: str

    @classmethod
    def load(cls, directory: str | Path) -> "ChatTemplate":
        """The checkpoint's template, else the ChatML default."""
        d = Path(directory)
        config: dict[str, Any] = {}
        if (d / "tokenizer_config.json").is_file():
            try:
                config = json.loads((d / "tokenizer_config.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{d / 'tokenizer_config.json'}: not valid JSON "
                                      f"({exc})") from None
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        source, origin = None, "default (ChatML)"
        if (d / TEMPLATE_FILE).is_file():
            source, origin = (d / TEMPLATE_FILE).read_text(), str(d / TEMPLATE_FILE)
        elif config.get("chat_template"):
            source = config["chat_template"]
            if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
            if not isinstance(source, str):
                raise CheckpointError(f"{d / 'tokenizer_config.json'}: chat_template must be a "
                                      "string or a list with a template named 'default'")
            origin = str(d / "tokenizer_config.json")
        if source is None or source == DEFAULT_TEMPLATE:  # also the default, saved by a run
            return cls(DEFAULT_TEMPLATE, _compile(DEFAULT_TEMPLATE, origin), bos, eos, True,
                       DEFAULT_STOP, origin)
        return cls(source, _compile(source, origin), bos, eos, False, (), origin)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The text of ``messages`` ([{"role", "content"}]), ending with the assistant's turn
        opened when ``add_generation_prompt``; ``ChatRenderError`` for an unknown role or
        what the template itself rejects."""
        from jinja2 import TemplateError

        for i, m in enumerate(messages):
            if m["role"] not in ROLES:
                raise ChatRenderError(f"messages.{i}.role: {m['role']!r} is not supported (use "
                                      f"one of {', '.join(ROLES)})", f"messages.{i}.role")
        try:
            return self.template.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as exc:
            raise ChatRenderError(f"the chat template rejected the messages: {exc}",
                                  "messages") from None

    def save(self, directory: str | Path) -> Path:
        """Write the template as ``chat_template.jinja`` into ``directory`` (where ``load``
        finds it first), so a checkpoint answers with the template it was trained on."""
        path = Path(directory) / TEMPLATE_FILE
        path.write_text(self.source)
        return path


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _compile(source: str, origin: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    # The settings transformers uses, so templates written for it render the same here.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise CheckpointError(f"{origin}: the chat template does not compile ({exc})") from None
