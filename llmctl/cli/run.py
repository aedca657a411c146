"""llmctl run: answer one prompt, streaming the reply to stdout.

Also home to what `run` and `chat` share: the generation options and opening a model
(pull if needed, check memory, load).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from llmctl.cli.common import JsonOpt, ModelArg
from llmctl.cli.output import Output
from llmctl.units import format_bytes

if TYPE_CHECKING:
    from llmctl.engines.base import Stats, TextEngine
    from llmctl.engines.registry import EngineSpec
    from llmctl.store.resolve import Runnable

SystemOpt = Annotated[str | None, typer.Option(help="A system prompt.")]
# The bounds of the numeric options are checked in one place, GenerationOptions.validate
# and LoadOptions.validate (llmctl.engines.base), for every command and engine; the
# minimums here only show the range in --help.
TemperatureOpt = Annotated[float, typer.Option(
    min=0.0, help="0 picks the likeliest token every time; at most 100.")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0)]
TopKOpt = Annotated[int, typer.Option(min=0, help="0 turns it off.")]
SeedOpt = Annotated[int | None, typer.Option(
    min=0, help="Same seed and options, same output; 0 to 4294967294. [default: random]",
    show_default=False)]
MaxTokensOpt = Annotated[int | None, typer.Option(
    min=1, help="Stop after this many tokens. [default: until the model stops]",
    show_default=False)]
CtxOpt = Annotated[int | None, typer.Option(
    min=16, help="Context length in tokens, at most the model's trained context. "
    "[default: the model's, at most 4096]", show_default=False)]
ThreadsOpt = Annotated[int | None, typer.Option(
    min=1, help="CPU threads, at most the CPUs this process may use. [default: the physical "
    "cores other processes leave free]", show_default=False)]
EngineOpt = Annotated[str | None, typer.Option(
    help="Engine to use. [default: chosen by the model's format]", show_default=False)]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Load time, tokens/s and peak memory on stderr.")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Load the model even when it looks too big for this machine's memory.")]


def run(
    model: ModelArg,
    prompt: Annotated[list[str] | None, typer.Argument(
        metavar="PROMPT", help="The prompt; piped stdin comes first, then this.",
        show_default=False)] = None,
    system: SystemOpt = None,
    temperature: TemperatureOpt = 0.8,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 40,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    engine: EngineOpt = None,
    json: JsonOpt = False,
    verbose: VerboseOpt = False,
    force: ForceOpt = False,
) -> None:
    """Run a model on one prompt and stream the reply to stdout.

    A catalog model that is not stored yet is pulled first. A model whose estimated memory
    (weights plus the cache for --ctx) is above 90% of what this machine lets llmctl use is
    refused (exit 5) unless --force. With --json, stdout gets JSON Lines:
    {"type": "token", "text": ...} per piece of text, then {"type": "done", ...} with token
    counts, timings and tokens/s.

    Examples:

    \b
        llmctl run smollm2 "What is the capital of France?"
        cat notes.txt | llmctl run smollm2 "Summarise this in three bullet points."
        llmctl run smollm2 --temperature 0 --json "Hi" | jq -r 'select(.type=="token").text'
    """
    from llmctl.engines.base import Done, GenerationOptions, Message
    from llmctl.errors import UsageError

    out = Output(json_mode=json)
    options = GenerationOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                max_tokens=max_tokens).validate()
    text = _read_prompt(prompt)
    if not text:
        raise UsageError("no prompt given", hint="pass PROMPT or pipe text on stdin")
    target, spec, llm = open_text_model(out, model, engine=engine, ctx=ctx, threads=threads,
                                        force=force)
    messages = ([Message("system", system)] if system else []) + [Message("user", text)]
    events = llm.generate(messages, options)
    wrote = False
    try:
        for event in events:
            if isinstance(event, Done):
                stats = event.stats
            elif json:
                out.json_line({"type": "token", "text": event.text})
            else:
                out.text(event.text)
                wrote = True
    except KeyboardInterrupt:
        events.close()
        if wrote:
            out.text("\n")  # leave the shell prompt on a line of its own
        raise
    if json:
        out.json_line({"type": "done", "model": target.name, "engine": spec.name,
                       **stats.to_dict()})
    else:
        out.text("\n")
    if verbose:
        report_stats(out, stats, threads=getattr(llm, "threads", None))


def open_text_model(out: Output, model: str, *, engine: str | None, ctx: int | None,
                    threads: int | None, force: bool
                    ) -> tuple[Runnable, EngineSpec, TextEngine]:
    """Find the model (pulling a catalog model first), check that it fits in memory, and
    load it: what `run` and `chat` do before their first token."""
    from llmctl.cli.common import open_store
    from llmctl.engines import registry
    from llmctl.engines.base import LoadOptions
    from llmctl.errors import UsageError
    from llmctl.memory import check_fits, model_shape
    from llmctl.store.resolve import runnable

    layout, catalog = open_store()
    with out.progress() as report:
        target = runnable(model, layout, catalog,
                          on_event=report)
    if target.kind != "text":
        raise UsageError(f"{target.name} is an image model", hint="use llmctl imagine")
    spec = registry.choose(target.format, target.kind, engine)
    # Bounds first: a --ctx past the model's trained context is a usage error, not a
    # memory estimate of terabytes.
    options, notes = LoadOptions(ctx, threads).validate(model_shape(target).trained_context)
    for note in notes:
        out.info(f"note: {note}")
    check = check_fits(target, ctx, force)
    if not check.fits:
        out.warn(f"{target.name} may not fit in memory (need about "
                 f"{format_bytes(check.estimate.total)}, have {format_bytes(check.allowed)}); "
                 "loading anyway (--force)")
    return target, spec, registry.load_text_engine(spec, target.path, options)


def report_stats(out: Output, stats: Stats, threads: int | None = None) -> None:
    """--verbose: Ollama's statistics block, on stderr, with the CPU threads the engine ran
    (the default depends on what else keeps the CPUs busy) when it has a number of them."""
    out.info(
        f"load duration:     {stats.load_seconds:.2f}s\n"
        f"prompt eval count: {stats.prompt_tokens} token(s)\n"
        f"prompt eval rate:  {stats.prompt_tokens_per_second:.2f} tokens/s\n"
        f"eval count:        {stats.generated_tokens} token(s)\n"
        f"eval rate:         {stats.generate_tokens_per_second:.2f} tokens/s\n"
        f"stop reason:       {stats.stop_reason}\n"
        + (f"threads:           {threads}\n" if threads else "")
        + f"peak memory:       {format_bytes(stats.peak_memory_bytes)}"
    )


def text_stdin() -> None:
    """Read stdin as UTF-8 whatever the locale, bytes that are not UTF-8 becoming U+FFFD:
    piped text with a stray byte (or a binary file) is still a prompt, instead of a
    UnicodeEncodeError on the surrogates Python would otherwise decode it to. No-op when
    stdin is closed (then `sys.stdin` is None)."""
    if sys.stdin is not None and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(encoding="utf-8", errors="replace")


def _read_prompt(words: list[str] | None) -> str:
    """stdin first (when it is not a terminal), then the arguments, as Ollama does."""
    parts = []
    if sys.stdin is not None and not sys.stdin.isatty():
        text_stdin()
        piped = sys.stdin.read().strip()
        if piped:
            parts.append(piped)
    if words:
        parts.append(" ".join(words))
    return "\n\n".join(parts)
