"""llmctl run: answer one prompt, streaming the reply to stdout."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.cli.options import (
    ComputeUnitOpt,
    CtxOpt,
    DtypeOpt,
    EngineOpt,
    FileOpt,
    ForceOpt,
    FormatOpt,
    GpuLayersOpt,
    JsonOpt,
    JsonSchemaOpt,
    MaxTokensOpt,
    ModelArg,
    PromptCacheOpt,
    PromptCacheRoOpt,
    SeedOpt,
    StopOpt,
    SystemFileOpt,
    SystemOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    TorchDeviceOpt,
    TrustPickleOpt,
    VerboseOpt,
)
from llmctl.cli.output import Output


def run(
    model: ModelArg,
    prompt: Annotated[list[str] | None, typer.Argument(
        metavar="PROMPT", help="The prompt; piped stdin comes first, then this.",
        show_default=False)] = None,
    system: SystemOpt = None,
    system_file: SystemFileOpt = None,
    file: FileOpt = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Send the prompt as it is, without the model's chat template.")] = False,
    stop: StopOpt = None,
    format: FormatOpt = None,
    json_schema: JsonSchemaOpt = None,
    temperature: TemperatureOpt = 0.8,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 40,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    engine: EngineOpt = None,
    gpu_layers: GpuLayersOpt = None,
    device: TorchDeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    compute_unit: ComputeUnitOpt = None,
    prompt_cache: PromptCacheOpt = None,
    prompt_cache_ro: PromptCacheRoOpt = False,
    json: JsonOpt = False,
    verbose: VerboseOpt = False,
    force: ForceOpt = False,
) -> None:
    """Run a model on one prompt and stream the reply to stdout.

    The prompt is piped stdin, then each --file, then PROMPT, joined by blank lines. A
    catalog model that is not stored yet is pulled first. A model whose estimated memory
    (weights plus the cache for --ctx) is above 90% of what this machine lets llmctl use is
    refused (exit 5) unless --force. With --json, stdout gets JSON Lines:
    {"type": "token", "text": ...} per piece of text, then {"type": "done", ...} with token
    counts, timings and tokens/s (and "value", the parsed reply, with --format or
    --json-schema). A constrained reply is printed once it is whole; one cut short by
    --max-tokens is exit 1, with nothing on stdout.

    Examples:

    \b
        llmctl run smollm2 "What is the capital of France?"
        cat notes.txt | llmctl run smollm2 "Summarise this in three bullet points."
        llmctl run smollm2 --temperature 0 --json "Hi" | jq -r 'select(.type=="token").text'
        llmctl run smollm2 -f report.md --system-file reviewer.txt "List the open risks."
        llmctl run smollm2 --raw --stop "\n\n" "The three primary colours are"
        llmctl run smollm2 --format json "List three colours as a JSON array." | jq .
        llmctl run smollm2 --json-schema person.json "Invent a person."
        llmctl run smollm2 -f manual.md --prompt-cache manual.kv "How do I reset it?"
        llmctl run ./SmolLM2-135M-Instruct --engine transformers --device cpu "Hi"
    """
    from llmctl import loader
    from llmctl.cli.options import (
        load_options,
        open_store,
        output_format,
        prompt_cache_file,
        read_prompt,
        system_prompt,
    )
    from llmctl.engines.text import Done, GenerationOptions, Message
    from llmctl.errors import UsageError
    from llmctl.store.names import parse_reference

    out = Output(json_mode=json)
    output, schema_took_stdin = output_format(format, json_schema)
    options = GenerationOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                max_tokens=max_tokens, stop=tuple(stop or ()),
                                output=output).validate()
    system = system_prompt(system, system_file)
    cache_file = prompt_cache_file(prompt_cache, prompt_cache_ro)
    if raw and system is not None:
        raise UsageError("--raw sends the prompt without the chat template, which is where "
                         "a system prompt goes", hint="leave out --raw or the system prompt")
    text = read_prompt(prompt, file, stdin=not schema_took_stdin)
    ref = parse_reference(model)
    with out.progress() as report:
        opened = loader.open_text(ref, *open_store(), engine=engine, force=force,
                                  options=load_options(ctx, threads, gpu_layers, device, dtype,
                                                       trust_pickle, compute_unit),
                                  on_event=report, on_note=out.note)
    messages = ([Message("system", system)] if system else []) + [Message("user", text)]
    tokens = (opened.engine.text_tokens(text) if raw
              else opened.engine.prompt_tokens(messages))
    cache = loader.restore_cache(opened, cache_file, out.note) if cache_file else None
    events = opened.engine.generate_from_tokens(tokens, options, keep_cache=bool(cache))
    parts: list[str] = []
    try:
        for event in events:
            if isinstance(event, Done):
                stats = event.stats
            else:
                parts.append(event.text)
                if output is None or json:
                    out.token(event.text)
    except KeyboardInterrupt:
        events.close()
        out.reply_stopped()  # leave the shell prompt on a line of its own
        raise
    if cache and not prompt_cache_ro:
        cache = loader.save_cache(opened, cache.file, cache, out.note)
    record = {"model": opened.model.name, "engine": opened.spec.name,
              "backend": opened.engine.backend, "gpu_layers": opened.engine.gpu_layers,
              **stats.to_dict()}
    if cache:
        record["prompt_cache"] = cache.to_dict()
    if output is not None:  # whole and valid: the constraint saw to it
        import json as json_module

        record["value"] = json_module.loads("".join(parts))
        if not json:
            out.text("".join(parts))
    out.reply_done(record)
    if verbose:
        out.stats(stats, opened.engine)
