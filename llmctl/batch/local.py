"""Prompts through one loaded model, `parallel` sequences at a time (engines.parallel),
each prompt's result a JSON object as the output file holds it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from llmctl.batch.lines import Prompt
from llmctl.engines.parallel import Failed, Request, generate_many
from llmctl.engines.text import Done, GenerationOptions, Message, TokenEngine
from llmctl.errors import UsageError


@dataclass(frozen=True)
class Defaults:
    """What a prompt's line does not say: the command's options."""

    options: GenerationOptions
    system: str | None = None


def options_for(prompt: Prompt, defaults: Defaults) -> GenerationOptions:
    """The generation options of one prompt: the defaults with its line's fields."""
    from llmctl.engines.constraint import OutputFormat

    fields = dict(prompt.overrides)
    fields.pop("system", None)
    if "stop" in fields:
        fields["stop"] = tuple(fields["stop"])
    if "json_schema" in fields:
        fields["output"] = OutputFormat(fields.pop("json_schema")).check()
    return replace(defaults.options, **fields).validate()


def messages_for(prompt: Prompt, defaults: Defaults) -> list[Message]:
    system = prompt.overrides.get("system", defaults.system)
    messages = list(prompt.messages)
    if system and messages[0].role != "system":
        messages.insert(0, Message("system", system))
    return messages


def run_prompts(engine: TokenEngine, prompts: Iterable[Prompt], defaults: Defaults,
                parallel: int, on_token: Callable[[], None] | None = None
                ) -> Iterator[dict[str, Any]]:
    """Each prompt's result as its reply ends (in that order, not the input's): id, text,
    stop_reason, token counts and seconds, with "object" for a JSON schema's reply, or id
    and "error" for a prompt that failed. `on_token` is called per generated token."""
    failed: list[dict[str, Any]] = []  # prompts refused before they reach the model
    schemas: dict[Any, bool] = {}

    def requests() -> Iterator[Request[Any]]:
        for prompt in prompts:
            try:
                options = options_for(prompt, defaults)
                tokens = engine.prompt_tokens(messages_for(prompt, defaults))
            except UsageError as exc:
                failed.append({"id": prompt.id, "error": _message(exc)})
                continue
            schemas[prompt.id] = options.output is not None
            yield Request(prompt.id, tokens, options)

    parts: dict[Any, list[str]] = {}
    for key, event in generate_many(engine, requests(), parallel):
        while failed:
            yield failed.pop(0)
        if isinstance(event, Failed):
            parts.pop(key, None)
            yield {"id": key, "error": _message(event.error)}
        elif isinstance(event, Done):
            yield _result(key, "".join(parts.pop(key, [])), event, schemas.pop(key, False))
        else:
            parts.setdefault(key, []).append(event.text)
            if on_token is not None:
                on_token()
    yield from failed


def _result(key: Any, text: str, done: Done, schema: bool) -> dict[str, Any]:
    stats = done.stats
    record: dict[str, Any] = {
        "id": key, "text": text, "stop_reason": stats.stop_reason,
        "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
        "seconds": round(stats.prompt_seconds + stats.generate_seconds, 3)}
    if schema:  # whole and valid: the constraint saw to it
        import json

        record["object"] = json.loads(text)
    return record


def _message(exc: Exception) -> str:
    hint = getattr(exc, "hint", None)
    return f"{exc}; {hint}" if hint else str(exc)


class Progress:
    """Prompts done of a total, generated tokens per second and the time left."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic):
        self.total, self.done, self.failed, self.tokens = total, 0, 0, 0
        self.clock = clock
        self.started = clock()

    def token(self) -> None:
        self.tokens += 1

    def finished(self, record: dict[str, Any]) -> None:
        self.done += 1
        self.failed += "error" in record

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def left(self) -> float | None:
        if not self.done:
            return None
        return self.elapsed / self.done * (self.total - self.done)

    def to_dict(self) -> dict[str, Any]:
        left = self.left
        return {"type": "progress", "done": self.done, "total": self.total,
                "failed": self.failed, "generated_tokens": self.tokens,
                "tokens_per_second": round(self.tokens_per_second, 2),
                "elapsed_seconds": round(self.elapsed, 2),
                "seconds_left": None if left is None else round(left, 1)}
