"""What `llmctl bench` is asked to measure: the tests, their sizes and repetitions, and
the shipped prompt set, parsed from the command line's comma lists and checked before any
model loads."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources

from llmctl.bench.results import Kind
from llmctl.engines.image import check_request
from llmctl.errors import UsageError

DEFAULT_STEPS = 20


@dataclass(frozen=True)
class TextTest:
    kind: Kind  # "pp", "tg" or "pg"
    n_prompt: int
    n_gen: int
    depth: int = 0

    @property
    def name(self) -> str:
        if self.kind == "pp":
            return f"pp{self.n_prompt}"
        if self.kind == "tg":
            return f"tg{self.n_gen}"
        return f"pg{self.n_prompt},{self.n_gen}"

    @property
    def context_needed(self) -> int:
        """Tokens the test puts in the context: depth, prompt (tg: one token), reply."""
        return self.depth + max(self.n_prompt, 1) + self.n_gen + 1


@dataclass(frozen=True)
class Settings:
    """What `llmctl bench` was asked to measure; lists run every combination."""

    n_prompt: tuple[int, ...] = (512,)
    n_gen: tuple[int, ...] = (128,)
    pg: tuple[tuple[int, int], ...] = ()
    depths: tuple[int, ...] = (0,)
    repetitions: int = 5
    threads: tuple[int | None, ...] = (None,)
    ctx: int | None = None
    warmup: bool = True
    load: bool = True  # the load rows
    prompt_set: tuple[str, ...] = ()
    prompt_gen: int = 128  # tokens generated per prompt of the prompt set
    steps: int | None = None  # image models; None: DEFAULT_STEPS
    width: int | None = None
    height: int | None = None
    text_options: tuple[str, ...] = ()  # text-only options the user gave (-d, -pg, ...)
    audio: str | None = None  # speech models: the audio file; None: the shipped clip

    @classmethod
    def from_options(cls, *, n_prompt: str | None, n_gen: str | None,
                     pg: list[str] | None, depth: str | None, repetitions: int,
                     threads: str | None, ctx: int | None, warmup: bool, load: bool,
                     prompt_set: str | None, steps: int | None, size: str | None,
                     audio: str | None = None) -> Settings:
        """The settings from the command line's options as typed (comma lists, "512" or
        "768x512"), checked (UsageError for what no model could run)."""
        given = {"-p": n_prompt, "-n": n_gen, "-pg": pg, "-d": depth, "--threads": threads,
                 "--ctx": ctx, "--prompt-set": prompt_set}
        prompts = tuple(names(prompt_set, "--prompt-set")) if prompt_set else ()
        # --prompt-set measures the prompts (-n: their replies' length); pp and tg run too
        # when -p or -pg asks for them.
        only_prompts = bool(prompts) and n_prompt is None and not pg
        gen = numbers(n_gen or "128", "-n")
        settings = cls(
            n_prompt=() if only_prompts else numbers(n_prompt or "512", "-p"),
            n_gen=() if only_prompts else gen, prompt_gen=next((n for n in gen if n > 0), 128),
            pg=tuple(pair(text) for text in pg or ()),
            depths=numbers(depth or "0", "-d"), repetitions=repetitions,
            threads=numbers(threads, "--threads") if threads else (None,), ctx=ctx,
            warmup=warmup, load=load, prompt_set=prompts, steps=steps,
            width=size_of(size)[0] if size else None, height=size_of(size)[1] if size else None,
            text_options=tuple(name for name, v in given.items() if v is not None),
            audio=audio)
        settings.check()
        return settings

    def tests(self) -> list[TextTest]:
        tests = []
        for depth in self.depths:
            tests += [TextTest("pp", n, 0, depth) for n in self.n_prompt if n > 0]
            tests += [TextTest("tg", 0, n, depth) for n in self.n_gen if n > 0]
            tests += [TextTest("pg", p, n, depth) for p, n in self.pg]
        return tests

    def check(self) -> None:
        """What can be refused before any model loads (exit 2)."""
        if self.repetitions < 1:
            raise UsageError(f"--repetitions {self.repetitions} is below 1",
                             hint="use -r 1 or more")
        sizes = [*self.n_prompt, *self.n_gen, *self.depths, *(n for p in self.pg for n in p)]
        if any(n < 0 for n in sizes):
            raise UsageError("-p, -n, -pg and -d take numbers of 0 or more",
                             hint="e.g. -p 512 -n 128")
        if any(p <= 0 or n <= 0 for p, n in self.pg):
            raise UsageError("-pg takes a prompt and a reply length above 0",
                             hint="e.g. -pg 512,128")
        if not self.tests() and not self.prompt_set:
            raise UsageError("nothing to measure: -p and -n are both 0 and no -pg or "
                             "--prompt-set is given", hint="e.g. -p 512 -n 128")
        unknown = [name for name in self.prompt_set if name not in prompt_set()]
        if unknown:
            raise UsageError(f"no prompt '{unknown[0]}' in the prompt set",
                             hint=f"choose from: {', '.join(prompt_set())}")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps {self.steps} is below 1", hint="use --steps 1 or more")


def names(text: str, option: str) -> list[str]:
    """A comma list's items: "llama, mlx" -> ["llama", "mlx"]."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise UsageError(f"{option} needs at least one value", hint=f"e.g. {option} llama")
    return items


def number(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{option} takes whole numbers, not '{text}'",
                         hint="e.g. -p 128,512") from None


def numbers(text: str, option: str) -> tuple[int, ...]:
    return tuple(number(part.strip(), option) for part in names(text, option))


def pair(text: str) -> tuple[int, int]:
    both = numbers(text, "-pg")
    if len(both) != 2:
        raise UsageError(f"-pg takes PROMPT,GEN, not '{text}'", hint="e.g. -pg 512,128")
    return both[0], both[1]


def size_of(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    size = number(width, "--size"), number(height or width, "--size")
    check_request(size[0], size[1], None)
    return size


def prompt_set() -> dict[str, str]:
    """The shipped prompts by name, shortest first."""
    text = resources.files("llmctl.data").joinpath("bench_prompts.toml").read_text("utf-8")
    return {entry["name"]: entry["text"] for entry in tomllib.loads(text)["prompt"]}


def speech_clip() -> str:
    """The speech clip speech models are measured on without --audio: "The North Wind and
    the Sun" read by espeak-ng, 37 s (benchmarks/speech_clip.py makes it)."""
    return str(resources.files("llmctl.data").joinpath("bench_speech.ogg"))
