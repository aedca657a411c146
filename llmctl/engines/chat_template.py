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
