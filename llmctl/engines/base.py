"""The contract every text engine keeps: `generate` yields `Token`s, then one `Done`.

`run`, `chat` and `bench` consume the same stream, so an engine is written once and every
command gets it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

Role = Literal["system", "user", "assistant"]
StopReason = Literal["stop", "length", "interrupted"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


# Context used when none is asked for: the model's own, at most this many tokens (more
# costs memory few prompts need). The engines and the memory estimate share it.
DEFAULT_CONTEXT = 4096


def default_context(requested: int | None, trained: int | None) -> int:
    """The context length an engine opens a model with."""
    return requested or min(trained or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


@dataclass(frozen=True)
class LoadOptions:
    context_length: int | None = None  # None: the engine's default for the model
    threads: int | None = None  # None: every core this process may use


@dataclass(frozen=True)
class GenerationOptions:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None  # None: a fresh random seed each time
    max_tokens: int | None = None  # None: until the model stops or the context is full
    ignore_eos: bool = False  # benchmarks generate a fixed number of tokens


@dataclass(frozen=True)
class Token:
    """One generated token. `text` is "" while a character's bytes are incomplete."""

    text: str


@dataclass(frozen=True)
class Stats:
    prompt_tokens: int
    generated_tokens: int
    prompt_seconds: float  # prompt processing, up to the first token
    generate_seconds: float  # from the first token to the last
    stop_reason: StopReason
    load_seconds: float = 0.0
    peak_memory_bytes: int = 0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generate_tokens_per_second(self) -> float:
        # The first token is produced by prompt processing; the rest each cost one decode.
        decoded = max(self.generated_tokens - 1, 0)
        return decoded / self.generate_seconds if self.generate_seconds else 0.0

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["prompt_tokens_per_second"] = round(self.prompt_tokens_per_second, 2)
        data["generate_tokens_per_second"] = round(self.generate_tokens_per_second, 2)
        return data


@dataclass(frozen=True)
class Done:
    stats: Stats


Event = Token | Done


class TextEngine(Protocol):
    name: str

    def generate(self, messages: list[Message], options: GenerationOptions) -> Iterator[Event]:
        """Stream the reply to `messages`, formatted with the model's own chat template."""
        ...

    def close(self) -> None: ...
