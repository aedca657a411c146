"""Render a model's own chat template (the Jinja text Hugging Face tokenizers ship, which
GGUF files carry as `tokenizer.chat_template`).

Rendered the way transformers renders it: a sandboxed environment, trim_blocks and
lstrip_blocks, loop controls, and the helpers templates call (`raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from llmctl.engines.text import Message
from llmctl.errors import EngineFailure


class TemplateError(EngineFailure):
    pass


def _raise(message: str) -> None:
    raise TemplateError(f"the model's chat template refused the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks training spans; render the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, Generation],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the model's chat template does not parse: {exc}") from None


def render(template: str, messages: Sequence[Message], *, bos_token: str = "",
           eos_token: str = "", add_generation_prompt: bool = True) -> str:
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the model's chat template failed: {exc}") from None


def plain(messages: Sequence[Message]) -> str:
    """For models without a template (base models): the text, one message after another."""
    return "\n\n".join(m.content for m in messages)


def prompt_text(template: str | None, messages: Sequence[Message], bos_token: str = "",
                eos_token: str = "") -> str:
    """The conversation as the text to tokenize: rendered by the model's chat template,
    or the plain text for a model without one. The engines that tokenize with a
    tokenizer of their own (onnx, executorch) share this."""
    if template:
        return render(template, messages, bos_token=bos_token, eos_token=eos_token)
    return plain(messages)


def hf_prompt_tokens(tokenizer: Any, messages: Sequence[Message], has_template: bool
                     ) -> list[int]:
    """The conversation as token ids through a Hugging Face tokenizer's own chat template
    (transformers renders it), or the plain text for a model without one. The engines on
    Hugging Face tokenizers (mlx, transformers) share this."""
    if not has_template:
        return list(tokenizer.encode(plain(messages)))
    import jinja2  # transformers renders templates with it

    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        tokens = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    except jinja2.TemplateError as exc:  # raise_exception() in the template, too
        raise TemplateError(
            f"the model's chat template refused the conversation: {exc}") from None
    # transformers 5 returns a BatchEncoding where 4 returned the ids.
    ids = tokens["input_ids"] if hasattr(tokens, "keys") else tokens
    return list(ids)


class IncrementalDetokenizer:
    """The text of a reply one token at a time, for tokenizers that decode only whole
    sequences (Hugging Face's): each token's text is what decoding the last few tokens
    with it adds to decoding them without it, held back while it ends in an unfinished
    character (U+FFFD). Decoding from a few tokens back, not from the start, keeps each
    step short and lets the tokenizer place spaces as it would in context."""

    def __init__(self, decode: Any):
        self._decode = decode  # list of ids -> str
        self._tokens: list[int] = []
        self._prefix = 0  # where the window decoded for context starts
        self._read = 0  # tokens up to here have been given out as text

    def add(self, token: int) -> str:
        self._tokens.append(token)
        before = self._decode(self._tokens[self._prefix:self._read])
        after = self._decode(self._tokens[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._tokens)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self._tokens[self._prefix:self._read])
        after = self._decode(self._tokens[self._prefix:])
        self._prefix = self._read = len(self._tokens)
        return after[len(before):]
