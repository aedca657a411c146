"""llmctl run: answer one prompt, streaming the reply to stdout."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.cli.options import (
    CtxOpt,
    EngineOpt,
    ForceOpt,
    JsonOpt,
    MaxTokensOpt,
    ModelArg,
    SeedOpt,
    SystemOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    VerboseOpt,
)
from llmctl.cli.output import Output


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
    from llmctl import loader
    from llmctl.cli.options import open_store, read_prompt
    from llmctl.engines.text import Done, GenerationOptions, LoadOptions, Message
    from llmctl.store.names import parse_reference

    out = Output(json_mode=json)
    options = GenerationOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                max_tokens=max_tokens).validate()
    text = read_prompt(prompt)
    ref = parse_reference(model)
    with out.progress() as report:
        opened = loader.open_text(ref, *open_store(), engine=engine,
                                  options=LoadOptions(ctx, threads), force=force,
                                  on_event=report, on_note=out.note)
    messages = ([Message("system", system)] if system else []) + [Message("user", text)]
    events = opened.engine.generate(messages, options)
    try:
        for event in events:
            if isinstance(event, Done):
                stats = event.stats
            else:
                out.token(event.text)
    except KeyboardInterrupt:
        events.close()
        out.reply_stopped()  # leave the shell prompt on a line of its own
        raise
    out.reply_done({"model": opened.model.name, "engine": opened.spec.name,
                    **stats.to_dict()})
    if verbose:
        out.stats(stats, threads=opened.engine.threads)
