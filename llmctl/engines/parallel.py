"""Several replies of one model at once: the shared generation loop over parallel sequences.

    batch  ->  generate_many(engine, requests, parallel)
               yields (key, Token | Done | Failed) as each sequence moves on

An engine that can decode several sequences in one batch gives `Slots` (`TokenEngine.
open_slots`): N sequences, each in its own part of the KV cache, one `advance` decoding
every running sequence's last token together (continuous batching: a slot freed by a
finished reply takes the next prompt at once). Each reply still runs through
`TokenEngine.generate_from_tokens`, the one loop, on a view of its slot (`_Sequence`): the
token budget, stop sequences, the end test, JSON constraints and the statistics are the same
code as `run`'s.

A prompt is processed alone in its slot, in the micro-batches `run` uses, never mixed into
the others' decoding step: llama.cpp computes a batch of 64 query tokens or more with other
kernels (`llama.SAME_RESULT_BATCH`), and a reply must be what `run` gives for its prompt.

Engines without slots (or `parallel` 1) run the replies one after another on the same loop.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from llmctl.engines.text import (
    Detokenizer,
    Done,
    GenerationOptions,
    Message,
    ReplyCut,
    Slots,
    Token,
    TokenEngine,
)
from llmctl.errors import LlmctlError, UsageError

if TYPE_CHECKING:
    from llmctl.engines.constraint import Matcher, OutputFormat

K = TypeVar("K")


@dataclass(frozen=True)
class Request(Generic[K]):
    key: K
    tokens: list[int]
    options: GenerationOptions


@dataclass(frozen=True)
class Failed:
    """A reply that could not be made (its prompt too long for the context, a JSON reply
    cut short): the others go on."""

    error: LlmctlError


def generate_many(engine: TokenEngine, requests: Iterable[Request[K]], parallel: int
                  ) -> Iterator[tuple[K, Token | Done | Failed]]:
    """Every request's reply, `parallel` at a time where the engine has slots. Events of
    different requests interleave; each request's own come in order and end with its
    `Done` or `Failed`. An EngineFailure of the model itself (not of one prompt) ends it."""
    slots = engine.open_slots(parallel) if parallel > 1 else None
    if slots is None:
        yield from _one_by_one(engine, requests)
        return
    try:
        yield from _interleaved(engine, slots, iter(requests))
    finally:
        slots.close()


def _one_by_one(engine: TokenEngine, requests: Iterable[Request[K]]
                ) -> Iterator[tuple[K, Token | Done | Failed]]:
    for request in requests:
        try:
            for event in engine.generate_from_tokens(request.tokens, request.options):
                yield request.key, event
        except LlmctlError as exc:
            if not _per_request(exc):
                raise
            yield request.key, Failed(exc)


def _per_request(exc: LlmctlError) -> bool:
    """Whether an error belongs to one request (its prompt, its options, its JSON) rather
    than to the model, which every other request would meet too."""
    return isinstance(exc, UsageError | ReplyCut)


@dataclass
class _Running(Generic[K]):
    key: K
    view: _Sequence
    reply: Iterator[Token | Done]


Events = Generator[tuple[Any, Token | Done | Failed], None, bool]


def _interleaved(engine: TokenEngine, slots: Slots, requests: Iterator[Request[K]]
                 ) -> Iterator[tuple[K, Token | Done | Failed]]:
    running: dict[int, _Running[K]] = {}

    def admit(slot: int) -> Generator[tuple[K, Token | Done | Failed], None, None]:
        """Start the next request that makes a first token in `slot`."""
        for request in requests:
            view = _Sequence(engine, slots, slot)
            entry = _Running(request.key, view, view.generate_from_tokens(
                request.tokens, request.options))
            if (yield from _pump(entry)):
                running[slot] = entry
                return

    try:
        for slot in range(slots.count):
            yield from admit(slot)
        while running:
            following = slots.advance({slot: entry.view.last for slot, entry in
                                       running.items()})
            for slot in list(running):
                entry = running[slot]
                entry.view.pending = following[slot]
                if not (yield from _pump(entry)):
                    del running[slot]
                    yield from admit(slot)
    finally:
        for entry in running.values():
            entry.reply.close()  # type: ignore[attr-defined]


def _pump(entry: _Running[K]) -> Events:
    """Move one reply on until it has handed out its next token and shown it (True: it
    waits for the slot's next decoding step), or has ended (False)."""
    handed = entry.view.handed
    while True:
        try:
            event = next(entry.reply)
        except StopIteration:
            return False
        except LlmctlError as exc:
            if not _per_request(exc):
                raise
            yield entry.key, Failed(exc)
            return False
        yield entry.key, event
        if isinstance(event, Done):
            entry.reply.close()  # type: ignore[attr-defined]
            return False
        if entry.view.handed > handed:
            return True


class _Sequence(TokenEngine):
    """One slot as the generation loop sees an engine: the loop runs unchanged, its token
    stream handing out what the slots' steps sample for this slot."""

    def __init__(self, engine: TokenEngine, slots: Slots, slot: int):
        self.engine, self.slots, self.slot = engine, slots, slot
        self.name = engine.name
        self.load_seconds = engine.load_seconds
        self.threads = engine.threads
        self.last = -1  # the token handed out last: the next step decodes it
        self.pending = -1  # the token the last step sampled for this slot
        self.handed = 0
        self._length = 0  # positions the slot's cache holds

    @property
    def context_length(self) -> int:
        return self.slots.context_length

    def prompt_tokens(self, messages: list[Message]) -> list[int]:
        return self.engine.prompt_tokens(messages)

    def text_tokens(self, text: str) -> list[int]:
        return self.engine.text_tokens(text)

    def _matcher(self, output: OutputFormat) -> Matcher:
        return self.engine._matcher(output)

    def _detokenizer(self) -> Detokenizer:
        return self.engine._detokenizer()

    def _is_end(self, token: int) -> bool:
        return self.engine._is_end(token)

    def _cache_length(self) -> int:
        return self._length

    def _peak_memory(self) -> int:
        return self.engine._peak_memory()

    def _steps(self, tokens: list[int], options: GenerationOptions, budget: int,
               matcher: Matcher | None = None) -> Generator[int, None, None]:
        try:
            token = self.slots.start(self.slot, tokens, options, matcher)
            self._length = len(tokens)
            while True:
                if matcher is not None:  # the token is the reply's now: the mask moves on
                    matcher.consume(token)
                self.last = token
                self.handed += 1
                yield token
                self._length += 1  # the step that sampled `pending` decoded `last`
                token = self.pending
        finally:
            self.slots.release(self.slot)
            self._length = 0
