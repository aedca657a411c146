"""The one generation loop (llmctl.engines.text.TokenEngine) on a scripted engine: what
every text engine gets from it without writing it again."""

from __future__ import annotations

import math
from collections.abc import Generator

import pytest

from llmctl.engines.text import (
    ByteDetokenizer,
    Done,
    GenerationOptions,
    Message,
    Token,
    TokenEngine,
)
from llmctl.errors import UsageError

END = 0
# Token ids -> bytes: 3 and 4 are the two halves of "é", 5 is a lone first byte; END has
# no text (as an end-of-turn token printed without special tokens).
PIECES = {END: b"", 1: b"  Hello", 2: b" world", 3: b"\xc3", 4: b"\xa9", 5: b"\xe2", 6: b" ",
          7: b"!"}


class ScriptedEngine(TokenEngine):
    """Yields the tokens it is given, records what the loop asked of it."""

    name = "scripted"

    def __init__(self, reply: list[int], context: int = 64):
        self.reply, self.context = reply, context
        self.asked = 0  # tokens the loop pulled from the stream
        self.closed = False
        self.options: GenerationOptions | None = None
        self.budget = 0

    @property
    def context_length(self) -> int:
        return self.context

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        return [7] * sum(len(m.content.split()) for m in messages)

    def text_tokens(self, text: str) -> list[int]:
        return [7] * len(text.split())

    def _steps(self, tokens: list[int], options: GenerationOptions, budget: int,
               matcher: object = None) -> Generator[int, None, None]:
        self.options, self.budget = options, budget
        return self._stream()

    def _stream(self) -> Generator[int, None, None]:
        try:
            for token in self.reply:
                self.asked += 1
                yield token
        finally:
            self.closed = True

    def _detokenizer(self) -> ByteDetokenizer:
        return ByteDetokenizer(PIECES.__getitem__)

    def _is_end(self, token: int) -> bool:
        return token == END


def run(engine: ScriptedEngine, **options: object) -> tuple[list[str], Done]:
    events = list(engine.generate_from_tokens([7, 7], GenerationOptions(**options)))
    assert isinstance(events[-1], Done)
    assert all(isinstance(e, Token) for e in events[:-1])
    return [e.text for e in events[:-1]], events[-1]


def test_one_token_event_per_token_leading_space_stripped_and_characters_whole() -> None:
    engine = ScriptedEngine([6, 1, 2, 3, 4, 7, END, 2])
    texts, done = run(engine)
    # " " alone is stripped to "", then the leading spaces of "  Hello"; é waits for its
    # second byte, in an event of its own.
    assert texts == ["", "Hello", " world", "", "é", "!"]
    stats = done.stats
    assert (stats.prompt_tokens, stats.generated_tokens, stats.stop_reason) == (2, 6, "stop")
    assert engine.asked == 7 and engine.closed  # nothing pulled past the end token
    assert stats.prompt_seconds >= 0 and stats.generate_seconds >= 0


def test_an_unfinished_character_at_the_end_comes_out_as_a_replacement() -> None:
    texts, _ = run(ScriptedEngine([1, 5]), max_tokens=2)
    assert texts == ["Hello", "", "\ufffd"]


def test_the_budget_is_max_tokens_or_what_the_context_leaves() -> None:
    engine = ScriptedEngine([2] * 50)
    texts, done = run(engine, max_tokens=3)
    assert len(texts) == 3 and done.stats.stop_reason == "length"
    assert engine.budget == 3 and engine.asked == 3 and engine.closed
    small = ScriptedEngine([2] * 50, context=6)  # 2 prompt tokens leave 4
    _, done = run(small)
    assert small.budget == 4 and done.stats.generated_tokens == 4
    with pytest.raises(UsageError, match="the prompt is 2 tokens but the context holds 2"):
        run(ScriptedEngine([2], context=2))


def test_ignore_eos_generates_past_the_end_token() -> None:
    texts, done = run(ScriptedEngine([2, END, 2]), ignore_eos=True, max_tokens=3)
    assert len(texts) == 3 and done.stats.stop_reason == "length"


def test_options_are_checked_and_a_seed_is_always_given() -> None:
    engine = ScriptedEngine([2])
    with pytest.raises(UsageError, match="--temperature nan"):
        run(engine, temperature=math.nan)
    assert engine.options is None  # refused before the engine was asked for anything
    run(engine, seed=42)
    assert engine.options is not None and engine.options.seed == 42
    run(engine)
    assert engine.options.seed is not None  # one of the loop's own, in the range of --seed


def test_closing_the_reply_closes_the_engine_stream() -> None:
    engine = ScriptedEngine([2] * 10)
    events = engine.generate([Message("user", "hi there")], GenerationOptions())
    assert next(events) == Token("world")
    events.close()
    assert engine.closed and engine.asked == 1
    assert engine.count_tokens([Message("user", "hi there")]) == 2


def test_the_engines_are_built_on_the_loop() -> None:
    from llmctl.engines.llama import LlamaEngine
    from llmctl.engines.mlx import MlxEngine

    assert issubclass(LlamaEngine, TokenEngine) and issubclass(MlxEngine, TokenEngine)
    assert MlxEngine.threads is None  # MLX sizes its own CPU work


def test_a_stop_sequence_spanning_tokens_ends_the_reply_unshown() -> None:
    engine = ScriptedEngine([1, 2, 7, END])
    texts, done = run(engine, stop=("o w",))
    assert "".join(texts) == "Hell"  # "Hello" + " world": the stop starts in the first token
    assert done.stats.stop_reason == "stop_sequence"
    assert engine.asked == 2 and engine.closed  # nothing pulled past the stop
    assert len(texts) == 2  # still one event per token


def test_text_held_for_a_stop_that_never_comes_is_shown() -> None:
    texts, done = run(ScriptedEngine([1, 2]), stop=("world!",), max_tokens=2)
    assert texts == ["Hello", " ", "world"]  # "world" waited: it might have begun "world!"
    assert done.stats.stop_reason == "length"
    texts, done = run(ScriptedEngine([1, 2, 7, END]), stop=("?",))
    assert "".join(texts) == "Hello world!" and done.stats.stop_reason == "stop"


def test_an_empty_stop_sequence_is_refused() -> None:
    with pytest.raises(UsageError, match="--stop"):
        run(ScriptedEngine([2]), stop=("",))


def test_an_engine_that_cannot_mask_its_logits_refuses_a_schema() -> None:
    from llmctl.engines.constraint import OutputFormat

    with pytest.raises(UsageError, match="cannot constrain its output"):
        run(ScriptedEngine([2]), output=OutputFormat())
