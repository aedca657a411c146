"""llmctl batch: a file of prompts through one model, results as JSON Lines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl.cli.options import (
    CtxOpt,
    EngineOpt,
    ForceOpt,
    GpuLayersOpt,
    MaxTokensOpt,
    ModelArg,
    SeedOpt,
    StopOpt,
    SystemOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    VerboseOpt,
)
from llmctl.cli.output import Output, batch_progress


def batch(
    model: ModelArg,
    input: Annotated[str, typer.Argument(
        metavar="PROMPTS", help="JSON Lines of {\"id\", \"prompt\" or \"messages\", ...}; "
        "- reads stdin.", show_default=False)],
    output: Annotated[str | None, typer.Option(
        "--output", "-o", metavar="FILE", help="Results as JSON Lines; a file that holds "
        "some already is resumed. - or none: stdout.", show_default=False)] = None,
    text: Annotated[bool, typer.Option(
        "--text", help="One plain prompt per line; its line number is its id.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start over: replace what -o FILE holds.")] = False,
    parallel: Annotated[int | None, typer.Option(
        "--parallel", "-p", min=1, help="Sequences decoded together. [default: as many "
        "as fit in memory, at most 8]", show_default=False)] = None,
    system: SystemOpt = None,
    stop: StopOpt = None,
    json_schema: Annotated[str | None, typer.Option(
        metavar="FILE", help="Every reply JSON of this schema (a line's json_schema wins).",
        show_default=False)] = None,
    temperature: TemperatureOpt = 0.8,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 40,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    engine: EngineOpt = None,
    gpu_layers: GpuLayersOpt = None,
    ray: Annotated[str | None, typer.Option(
        metavar="ADDRESS", envvar="LLMCTL_RAY_ADDRESS", help="Spread the prompts over a Ray "
        "cluster: auto (the running one), local (a throw-away one here) or HOST:PORT.",
        show_default=False)] = None,
    model_path: Annotated[str | None, typer.Option(
        metavar="PATH", help="With --ray: the model's file or folder, at this path on every "
        "node. [default: each node's own store, pulled there when missing]",
        show_default=False)] = None,
    json: Annotated[bool, typer.Option(
        "--json", help="Progress as JSON Lines on stderr.")] = False,
    verbose: VerboseOpt = False,
    force: ForceOpt = False,
) -> None:
    """Run a model over a file of prompts, several at once; results as JSON Lines.

    Each input line is {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]},
    with optional system, max_tokens, temperature, seed, json_schema and stop (a line's
    fields win over the options). Each result line is {"id", "text", "stop_reason",
    "prompt_tokens", "generated_tokens", "seconds"}, with "object" for a json_schema
    reply, or "error" (and "line" for an input line that is not a prompt). Results are
    written as each prompt ends, so a run that stops is resumed by running it again: the
    ids -o FILE holds are skipped. A line that fails never stops the others; the exit code
    is then 1, with the count on stderr. --parallel sequences share one model (llama.cpp,
    MLX): at --temperature 0 each reply is the one `llmctl run` gives.

    Examples:

    \b
        llmctl batch smollm2 prompts.jsonl -o results.jsonl
        llmctl batch smollm2 --text questions.txt --temperature 0 -o answers.jsonl
        cat prompts.jsonl | llmctl batch smollm2 - | jq -r .text
        llmctl batch smollm2 prompts.jsonl --json-schema person.json -o people.jsonl
        llmctl batch smollm2 prompts.jsonl -o results.jsonl --ray auto
    """
    from dataclasses import replace

    from llmctl import loader
    from llmctl.batch.lines import LineError, Prompt, read_prompts
    from llmctl.batch.local import Defaults, Progress, run_prompts
    from llmctl.batch.results import Results, input_error
    from llmctl.cli.options import load_options, open_store, output_format, read_input
    from llmctl.engines.text import GenerationOptions
    from llmctl.store.names import parse_reference

    out = Output()
    schema, _ = output_format(None, json_schema)
    defaults = Defaults(GenerationOptions(
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens,
        stop=tuple(stop or ()), output=schema).validate(), system)
    ref = parse_reference(model)
    items = list(read_prompts(read_input(input, "PROMPTS"), text=text))
    results = Results(None if output in (None, "-") else Path(output), overwrite=overwrite)
    todo = [item for item in items if not results.done(item)]
    prompts = [item for item in todo if isinstance(item, Prompt)]
    if results.earlier:
        out.info(f"resuming: {results.earlier} results in {output} already, "
                 f"{len(todo)} prompts to go")
    progress = Progress(len(todo))
    try:
        with batch_progress(out, json) as report:
            for error in (item for item in todo if isinstance(item, LineError)):
                record = input_error(error)
                results.write(record)
                progress.finished(record)
                report(progress)
            if ray:
                from llmctl.batch.ray import run_on_ray

                records = run_on_ray(
                    ray, prompts, model=model, model_path=model_path, engine=engine,
                    load=load_options(ctx, threads, gpu_layers), defaults=defaults,
                    parallel=parallel or 0, force=force,
                    on_note=out.info)
            elif prompts:
                with out.progress() as pulling:
                    options = replace(load_options(ctx, threads, gpu_layers),
                                      sequences=parallel or 0,
                                      most_sequences=min(len(prompts),
                                                         parallel or loader.MOST_SEQUENCES))
                    opened = loader.open_text(ref, *open_store(), engine=engine,
                                              options=options, force=force,
                                              on_event=pulling, on_note=out.note)
                if verbose:
                    out.info(f"{opened.model.name} on {opened.spec.name}: "
                             f"{opened.sequences} sequences at once")
                records = run_prompts(opened.engine, prompts, defaults, opened.sequences,
                                      on_token=progress.token)
            else:
                records = iter(())
            for record in records:
                results.write(record)
                if ray:  # tokens are counted by the workers
                    progress.tokens += record.get("generated_tokens", 0)
                progress.finished(record)
                report(progress)
        results.sync()
    finally:
        results.close()
    if progress.failed:
        where = f" (see \"error\" in {output})" if output not in (None, "-") else ""
        out.error(f"{progress.failed} of {progress.total} prompts failed{where}")
        raise typer.Exit(1)
