"""llmctl bench: tokens/s of text models, seconds per step of image models, in one table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from llmctl.cli.options import CtxOpt, ForceOpt, QuietOpt, complete_model
from llmctl.cli.output import Output

if TYPE_CHECKING:
    from llmctl.bench.runner import Progress

ListOpt = Annotated[str | None, typer.Option(show_default=False)]


def bench(
    models: Annotated[list[str] | None, typer.Argument(
        metavar="MODEL...", help="Models to measure: NAME[:TAG], a path or an ID prefix.",
        autocompletion=complete_model, show_default=False)] = None,
    n_prompt: Annotated[str | None, typer.Option(
        "-p", "--n-prompt", help="Prompt lengths (pp tests), comma-separated; 0: none. "
        "[default: 512]", show_default=False)] = None,
    n_gen: Annotated[str | None, typer.Option(
        "-n", "--n-gen", help="Generation lengths (tg tests); 0: none. [default: 128]",
        show_default=False)] = None,
    pg: Annotated[list[str] | None, typer.Option(
        "-pg", help="PROMPT,GEN: both in one request; repeat for more.",
        show_default=False)] = None,
    depth: Annotated[str | None, typer.Option(
        "-d", "--depth", help="Tokens already in the context before each test, "
        "comma-separated. [default: 0]", show_default=False)] = None,
    repetitions: Annotated[int, typer.Option("-r", "--repetitions", min=1)] = 5,
    threads: Annotated[str | None, typer.Option(
        "-t", "--threads", help="CPU threads (llama.cpp), comma-separated. [default: the "
        "physical cores other processes leave free]", show_default=False)] = None,
    ctx: CtxOpt = None,
    warmup: Annotated[bool, typer.Option(help="One untimed run before each test.")] = True,
    load: Annotated[bool, typer.Option(help="Measure load times (cold and warm).")] = True,
    engine: Annotated[str | None, typer.Option(
        help="Engines, comma-separated, or 'all': the model and its stored conversions run "
        "on each. [default: the model's own]", show_default=False)] = None,
    prompt_set: Annotated[str | None, typer.Option(
        help="Shipped prompts through the chat template: short,medium,long (-n: the "
        "replies' length; add -p or -pg for pp/tg tests too).",
        show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(
        help="Denoising steps (image models). [default: 20]", show_default=False)] = None,
    size: Annotated[str | None, typer.Option(
        help="Image size: 512 or WIDTHxHEIGHT (image models). [default: the model's]",
        show_default=False)] = None,
    audio: Annotated[str | None, typer.Option(
        metavar="FILE", help="Speech models: the audio to transcribe. [default: a shipped "
        "37 s clip of read English]", show_default=False)] = None,
    output: Annotated[str, typer.Option(
        "-o", "--output", help="md, csv, json, jsonl or sql (CREATE TABLE + INSERT).")] = "md",
    json: Annotated[bool, typer.Option("--json", help="The same as -o json.")] = False,
    history: Annotated[bool, typer.Option(
        "--history", help="List earlier runs (of MODEL, when given) and exit.")] = False,
    compare: Annotated[str | None, typer.Option(
        "--compare", help="Show the change against an earlier run: a run ID, or 'last' "
        "(the newest run of the same model on this machine).", show_default=False)] = None,
    no_save: Annotated[bool, typer.Option("--no-save", help="Do not save this run.")] = False,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
) -> None:
    """Measure models: tokens/s, time to first token, load time, seconds per image.

    Tests as llama-bench runs them (pp512: a 512-token prompt; tg128: 128 generated
    tokens; pg512,128: both in one request), each -r times after a warm-up, as mean ±
    stddev. Image models: seconds per step and per image. Speech models: the real-time
    factor (seconds of processing per second of audio; below 1 is faster than real time).
    With --engine llama,mlx the model's stored conversions (llmctl convert) run too, in
    the same table. Every run is saved in the store's history unless --no-save.
    Progress goes to stderr; the table to stdout.

    Examples:

    \b
        llmctl bench smollm2
        llmctl bench smollm2 -p 128,512 -n 0 -t 1,2 -o csv > pp.csv
        llmctl bench smollm2 -d 0,1024 -r 3
        llmctl bench smollm2 --engine llama,mlx --prompt-set short,medium,long
        llmctl bench smollm2 --compare last
        llmctl bench --history
        llmctl bench sd1.5 --steps 20 --size 512
        llmctl bench whisper whisper:small -r 3 --audio memo.m4a
    """
    import sys

    from llmctl.bench import formats, runner
    from llmctl.bench.history import History
    from llmctl.bench.settings import Settings, names, number
    from llmctl.cli.options import open_store
    from llmctl.errors import UsageError

    out = Output(quiet=quiet)
    output = "json" if json else output
    if output not in formats.FORMATS:
        raise UsageError(f"unknown output format '{output}'",
                         hint=f"choose one of: {', '.join(formats.FORMATS)}")
    layout, catalog = open_store()
    if history:
        with History(layout.bench_history) as db:
            _show_history(out, db.runs(models[0] if models else None), output)
        return
    if not models:
        raise UsageError("no model given", hint="e.g. llmctl bench smollm2")
    settings = Settings.from_options(
        n_prompt=n_prompt, n_gen=n_gen, pg=pg, depth=depth, repetitions=repetitions,
        threads=threads, ctx=ctx, warmup=warmup, load=load, prompt_set=prompt_set,
        steps=steps, size=size, audio=audio)
    engines = tuple(names(engine, "--engine")) if engine else ()
    with out.progress() as report:
        run = runner.bench(models, runner.Context(
            layout, catalog, settings, force=force, on_event=report, on_note=out.note,
            on_progress=lambda p: out.measured(_progress_line(p), p.finished)),
            engines, argv=sys.argv[1:])
    compared = None
    with History(layout.bench_history) as db:
        if compare is not None:
            compared = db.compare(run.results, run.machine.key,
                                  None if compare == "last" else number(compare, "--compare"))
            if not compared:
                out.info("note: no earlier run of these tests on this machine to compare "
                         "with")
            elsewhere = {c.before_run for c in compared.values()
                         if c.machine_key != run.machine.key}
            for other in sorted(elsewhere):
                out.warn(f"run {other} was measured on another machine: its figures say "
                         "little about this one's")
        if not no_save:
            db.save(run)
            out.info(f"saved as run {run.id}; compare later with: llmctl bench "
                     f"{' '.join(models)} --compare last")
    out.text(formats.render(output, run.results, run.machine, run.id, compared))


def _progress_line(p: Progress) -> str:
    threads = f" t={p.threads}" if p.threads else ""
    figure = f"{p.mean:.2f} {p.unit}" if p.done else "..."
    return f"{p.model} {p.engine}{threads} {p.test}: {p.done}/{p.total} {figure}"


def _show_history(out: Output, runs: list, output: str) -> None:
    out.json_mode = output in ("json", "jsonl")
    out.records(runs, record=lambda r: r.__dict__, name=lambda r: str(r.id),
                columns=("RUN", "STARTED", "MODELS", "ROWS", "CPU", "LLMCTL"),
                row=lambda r: (str(r.id), r.started, ", ".join(r.models), str(r.rows),
                               r.cpu, r.llmctl_version))
