"""llmctl run: answer one prompt, streaming the reply to stdout."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from llmctl.cli.common import JsonOpt, ModelArg
from llmctl.cli.output import Output, format_bytes


def run(
    model: ModelArg,
    prompt: Annotated[list[str] | None, typer.Argument(
        metavar="PROMPT", help="The prompt; piped stdin comes first, then this.",
        show_default=False)] = None,
    system: Annotated[str | None, typer.Option(help="A system prompt.")] = None,
    temperature: Annotated[float, typer.Option(
        min=0.0, help="0 picks the likeliest token every time.")] = 0.8,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.95,
    top_k: Annotated[int, typer.Option(min=0, help="0 turns it off.")] = 40,
    seed: Annotated[int | None, typer.Option(
        min=0, help="Same seed and options, same output. [default: random]",
        show_default=False)] = None,
    max_tokens: Annotated[int | None, typer.Option(
        min=1, help="Stop after this many tokens. [default: until the model stops]",
        show_default=False)] = None,
    ctx: Annotated[int | None, typer.Option(
        min=16, help="Context length in tokens. [default: the model's, at most 4096]",
        show_default=False)] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads. [default: physical cores]",
        show_default=False)] = None,
    engine: Annotated[str | None, typer.Option(
        help="Engine to use. [default: chosen by the model's format]",
        show_default=False)] = None,
    json: JsonOpt = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Load time, tokens/s and peak memory on stderr.")] = False,
) -> None:
    """Run a model on one prompt and stream the reply to stdout.

    A catalog model that is not stored yet is pulled first. With --json, stdout gets JSON
    Lines: {"type": "token", "text": ...} per piece of text, then {"type": "done", ...}
    with token counts, timings and tokens/s.

    Examples:

    \b
        llmctl run smollm2 "What is the capital of France?"
        cat notes.txt | llmctl run smollm2 "Summarise this in three bullet points."
        llmctl run smollm2 --temperature 0 --json "Hi" | jq -r 'select(.type=="token").text'
    """
    from llmctl.cli.common import open_store
    from llmctl.engines import registry
    from llmctl.engines.base import Done, GenerationOptions, LoadOptions, Message
    from llmctl.errors import UsageError
    from llmctl.store.pull import runnable

    out = Output(json_mode=json)
    text = _read_prompt(prompt)
    if not text:
        raise UsageError("no prompt given", hint="pass PROMPT or pipe text on stdin")
    layout, catalog = open_store()
    with out.progress() as report:
        target = runnable(model, layout, catalog,
                          on_event=lambda e: report(e.model, e.status, e.completed, e.total))
    if target.kind != "text":
        raise UsageError(f"{target.name} is an image model", hint="use llmctl imagine")
    spec = registry.choose(target.format, target.kind, engine)
    llm = registry.load_text_engine(spec, target.path, LoadOptions(ctx, threads))
    messages = ([Message("system", system)] if system else []) + [Message("user", text)]
    options = GenerationOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                max_tokens=max_tokens)
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
        out.info(
            f"load duration:     {stats.load_seconds:.2f}s\n"
            f"prompt eval count: {stats.prompt_tokens} token(s)\n"
            f"prompt eval rate:  {stats.prompt_tokens_per_second:.2f} tokens/s\n"
            f"eval count:        {stats.generated_tokens} token(s)\n"
            f"eval rate:         {stats.generate_tokens_per_second:.2f} tokens/s\n"
            f"stop reason:       {stats.stop_reason}\n"
            f"peak memory:       {format_bytes(stats.peak_memory_bytes)}"
        )


def _read_prompt(words: list[str] | None) -> str:
    """stdin first (when it is not a terminal), then the arguments, as Ollama does."""
    parts = []
    if sys.stdin is not None and not sys.stdin.isatty():
        piped = sys.stdin.read().strip()
        if piped:
            parts.append(piped)
    if words:
        parts.append(" ".join(words))
    return "\n\n".join(parts)
