"""Replies constrained while they are sampled: any JSON (`--format json`) or JSON that
validates against a schema (`--json-schema`), on every text engine through one path.

llguidance compiles the schema into a grammar over the model's own tokens; before each
token is sampled, `Matcher.allowed()` says which tokens keep the reply inside the grammar
and the engine masks every other one out of its logits; the sampled token is then fed
back (`consume`). So the reply cannot leave the schema whatever the temperature, and
once the JSON is complete only the end-of-reply token is allowed. llguidance (the Rust
library behind Guidance, also built into llama.cpp as an option) was chosen over
llama.cpp's GBNF converter because one library serves both llama.cpp and MLX, it computes
a mask in tens of microseconds, and it refuses schema features it cannot enforce instead
of ignoring them.

Import-light at the top: the option checks use `OutputFormat` before any model loads;
llguidance, numpy and jsonschema are imported when a reply is constrained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmctl.errors import EngineUnavailable, UsageError

INSTALL = "pip install llguidance jsonschema (included in llmctl[llama] and llmctl[mlx])"


# `--format json`: any JSON value, within bounds. A grammar of all JSON lets a small model
# write one string (or nest one level deeper) forever: SmolLM2 at temperature 1 wrote a
# key of dates until its context ran out. So strings are at most 100 characters (keys 40),
# arrays and objects hold at most 12 entries, and values nest at most 3 levels deep.
MAX_DEPTH, MAX_ENTRIES, MAX_STRING, MAX_KEY = 3, 12, 100, 40
# Numbers too: unbounded, it wrote digits of one number for thousands of tokens. At most
# 16 digits before the point and 6 after.
NUMBER = {"type": "number", "minimum": -1e16, "maximum": 1e16, "multipleOf": 1e-6}


def _any_json(depth: int = MAX_DEPTH) -> dict[str, Any]:
    scalars: list[dict[str, Any]] = [{"type": "string", "maxLength": MAX_STRING},
                                     NUMBER, {"type": "boolean"}, {"type": "null"}]
    if depth == 1:
        return {"anyOf": scalars}
    inner = {"$ref": f"#/$defs/level{depth - 1}"}
    key = f'^[^"\\\\\\x00-\\x1f]{{1,{MAX_KEY}}}$'
    return {"anyOf": [*scalars,
                      {"type": "array", "items": inner, "maxItems": MAX_ENTRIES},
                      {"type": "object", "patternProperties": {key: inner},
                       "additionalProperties": False, "maxProperties": MAX_ENTRIES}]}


ANY_JSON = {"$defs": {f"level{d}": _any_json(d) for d in range(1, MAX_DEPTH + 1)},
            "$ref": f"#/$defs/level{MAX_DEPTH}"}


@dataclass(frozen=True)
class OutputFormat:
    """What a reply must be: JSON matching `schema`, or any JSON value when it is None."""

    schema: dict[str, Any] | None = None

    @property
    def grammar(self) -> str:
        from llguidance import LLMatcher

        # Whitespace as JSON allows it would let a model pad forever: compact separators,
        # as json.dumps writes them.
        options = {"whitespace_flexible": False, "item_separator": ", ",
                   "key_separator": ": "}
        return LLMatcher.grammar_from_json_schema(self.schema or ANY_JSON, defaults=options)

    def check(self) -> OutputFormat:
        """UsageError for a schema that is not valid JSON Schema, or that uses what
        llguidance cannot enforce (named): never a silently partial constraint."""
        if self.schema is None:
            return self
        _libraries()
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(self.schema)
        except SchemaError as exc:
            raise UsageError(f"the JSON schema is not valid: {exc.message}",
                             hint="check it against json-schema.org's rules") from None
        from llguidance import LLMatcher

        failed, messages = LLMatcher.validate_grammar_with_warnings(self.grammar)
        if failed or messages:
            raise UsageError(f"the JSON schema cannot be enforced while sampling: "
                             f"{'; '.join(messages)}",
                             hint="README lists the schema features llmctl enforces")
        return self


def parse_schema(text: str, where: str) -> OutputFormat:
    """The schema in `text` (from a file, stdin or the option itself), checked."""
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the JSON schema from {where} is not JSON: {exc}",
                         hint="pass a file, JSON text, or - for stdin") from None
    if not isinstance(schema, dict):
        raise UsageError(f"the JSON schema from {where} is not a JSON object",
                         hint='e.g. {"type": "object", "properties": {...}}')
    return OutputFormat(schema).check()


def schema_from(value: str, option: str) -> OutputFormat:
    """The schema an option names: the schema itself (text starting with { or [), else
    the file at that path (`--json-schema`, chat's `/set schema`)."""
    if value.lstrip().startswith(("{", "[")):
        return parse_schema(value, option)
    from pathlib import Path

    try:
        text = Path(value).expanduser().read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"{option} {value}: {exc.strerror or exc}",
                         hint="check the path") from None
    return parse_schema(text, value)


def _libraries() -> None:
    try:
        import jsonschema  # noqa: F401
        import llguidance  # noqa: F401
    except ImportError as exc:
        raise EngineUnavailable("constrained output", f"{exc.name} is not installed",
                                INSTALL) from None


class Matcher:
    """One reply's grammar state over a vocabulary of `size` tokens."""

    def __init__(self, tokenizer: Any, output: OutputFormat, size: int):
        import numpy as np
        from llguidance import LLMatcher

        self._np = np
        self._matcher = LLMatcher(tokenizer, output.grammar, log_level=0)
        if self._matcher.is_error():
            raise UsageError(f"the JSON schema cannot be enforced: "
                             f"{self._matcher.get_error()}")
        self.size = size
        words = (max(size, tokenizer.vocab_size) + 31) // 32
        self._bits = np.zeros(words, dtype=np.int32)

    def allowed(self) -> Any:
        """A boolean array over the vocabulary: the tokens that keep the reply valid."""
        np = self._np
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[:self.size].astype(bool)

    def mask(self, logits: Any) -> None:
        """-inf in `logits` (a numpy array over the vocabulary, or over the model's
        padded one: the padding past `size` is no token, never allowed) for every token
        not allowed, in place."""
        logits[:self.size][~self.allowed()] = -self._np.inf
        logits[self.size:] = -self._np.inf

    def consume(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """The reply so far is a whole value the grammar accepts (or it has ended so)."""
        matcher = self._matcher
        return not matcher.is_error() and (matcher.is_accepting() or matcher.is_stopped())


def llama_tokenizer(vocab: Any) -> Any:
    _libraries()
    from llguidance.llamacpp import lltokenizer_from_vocab

    return lltokenizer_from_vocab(vocab)


def hf_tokenizer(tokenizer: Any) -> Any:
    _libraries()
    from llguidance.hf import from_tokenizer

    return from_tokenizer(tokenizer)
