"""The batch input: one prompt per line, as JSON objects or as plain text.

A line that cannot be a prompt (not JSON, no prompt, a field of the wrong type, an id
given twice) becomes a `LineError` with its line number; the others still run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmctl.engines.text import Message

Id = str | int
ROLES = ("system", "user", "assistant")
# Fields of an input line beside id and prompt/messages: what it may change of the defaults.
OVERRIDES = {"system": str, "max_tokens": int, "temperature": float, "seed": int,
             "json_schema": dict, "stop": list}
FIELDS = ("id", "prompt", "messages", *OVERRIDES)


@dataclass(frozen=True)
class Prompt:
    line: int  # 1-based, in the input
    id: Id
    messages: tuple[Message, ...]
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LineError:
    line: int
    message: str
    id: Id | None = None


def read_prompts(lines: Iterable[str], *, text: bool = False
                 ) -> Iterator[Prompt | LineError]:
    """Each input line as a Prompt, or the LineError that says why it is not one. Blank
    lines are skipped; with `text`, every other line is a prompt whose id is its line
    number."""
    seen: dict[Id, int] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if text:
            yield Prompt(number, number, (Message("user", line),))
            continue
        item = parse_line(number, line)
        if isinstance(item, Prompt):
            if (first := seen.get(item.id)) is not None:
                item = LineError(number, f"id {item.id!r} is given twice (first on line "
                                         f"{first})", item.id)
            else:
                seen[item.id] = number
        yield item


def parse_line(number: int, line: str) -> Prompt | LineError:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        return LineError(number, f"not JSON ({exc.msg} at column {exc.colno}); use --text "
                                 "for one plain prompt per line")
    if not isinstance(data, dict):
        return LineError(number, f"a JSON {type(data).__name__}, not an object with a prompt")
    raw_id = data.get("id", number)
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        return LineError(number, "id must be a string or an integer")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        return LineError(number, f"unknown field {', '.join(map(repr, unknown))} (fields: "
                                 f"{', '.join(FIELDS)})", raw_id)
    try:
        messages = _messages(data)
        overrides = {name: _checked(name, data[name]) for name in OVERRIDES if name in data
                     and data[name] is not None}
    except ValueError as exc:
        return LineError(number, str(exc), raw_id)
    return Prompt(number, raw_id, messages, overrides)


def _messages(data: dict[str, Any]) -> tuple[Message, ...]:
    prompt, messages = data.get("prompt"), data.get("messages")
    if (prompt is None) == (messages is None):
        raise ValueError("give one of prompt (a string) or messages (a list)" if prompt is None
                         else "give prompt or messages, not both")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a string with some text")
        return (Message("user", prompt),)
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a list of {\"role\", \"content\"} objects")
    out = []
    for i, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise ValueError(f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, "
                             "\"content\": a string}")
        out.append(Message(message["role"], message["content"]))
    if out[-1].role != "user":
        raise ValueError("the last message must be the user's: the reply answers it")
    return tuple(out)


def _checked(name: str, value: Any) -> Any:
    kind = OVERRIDES[name]
    if name == "stop" and isinstance(value, str):
        value = [value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        names = {str: "a string", int: "an integer", float: "a number", dict: "an object",
                 list: "a string or a list of strings"}
        raise ValueError(f"{name} must be {names[kind]}")
    if name == "stop" and not all(isinstance(s, str) and s for s in value):
        raise ValueError("stop must be a string or a list of non-empty strings")
    return value
