"""llmctl chat: a conversation in the terminal, or one reply per line of piped input."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from llmctl.cli.options import (
    ComputeUnitOpt,
    CtxOpt,
    DtypeOpt,
    EngineOpt,
    ForceOpt,
    FormatOpt,
    GpuLayersOpt,
    JsonOpt,
    JsonSchemaOpt,
    MaxTokensOpt,
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
    complete_model,
)
from llmctl.cli.output import Output
from llmctl.units import format_age

if TYPE_CHECKING:
    from llmctl.chat import ConversationStore


def chat(
    model: Annotated[str | None, typer.Argument(
        metavar="[MODEL]", help="A model: NAME[:TAG], a .gguf path or an ID prefix "
        "(with --resume, the conversation's model by default).",
        autocompletion=complete_model, show_default=False)] = None,
    system: SystemOpt = None,
    system_file: SystemFileOpt = None,
    stop: StopOpt = None,
    format: FormatOpt = None,
    json_schema: JsonSchemaOpt = None,
    resume: Annotated[str | None, typer.Option(
        metavar="ID", help="Continue a saved conversation (an ID or a unique prefix).",
        show_default=False)] = None,
    list_: Annotated[bool, typer.Option(
        "--list", help="List saved conversations (newest first) and exit.")] = False,
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
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Process the whole conversation for every reply, and save no "
        "cache with it.")] = False,
    listen_model: Annotated[str, typer.Option(
        metavar="MODEL", help="The speech model /listen transcribes with (loaded at the "
        "first /listen).", autocompletion=complete_model)] = "whisper",
    json: JsonOpt = False,
    verbose: VerboseOpt = False,
    force: ForceOpt = False,
) -> None:
    """Chat with a model, in the terminal or through a pipe.

    In a terminal: line editing and history, slash commands (/help), replies streamed.
    Conversations are saved under the store after every reply ($LLMCTL_HOME/conversations)
    and resumed with --resume ID. When the history outgrows the context, the oldest turns
    are left out, with a note on stderr. With piped input, each line (or \"\"\"-block) is one
    message and each reply goes to stdout followed by a newline; with --json, the events
    of `run --json`, the "done" event adding the reply's text, turn and conversation ID.
    Piped input is read as UTF-8 (other bytes become U+FFFD); a closed stdin is a usage
    error (exit 2), as there is nothing to answer.

    The model's KV cache is kept between turns, so each reply processes only the new
    message (the reply is the same as without the cache; --no-cache turns it off). When
    the session ends it is saved with the conversation, and --resume loads it.

    Examples:

    \b
        llmctl chat smollm2
        llmctl chat smollm2 --system "Answer in French." --temperature 0
        llmctl chat smollm2 --listen-model whisper:small   (then: /listen memo.m4a)
        llmctl chat smollm2 --system-file persona.txt --stop "User:"
        printf 'A cat\nA dog\n' | llmctl chat smollm2 --json-schema animal.json --json
        printf 'Hi\\nBye\\n' | llmctl chat smollm2 --json | jq -r 'select(.type=="done").text'
        llmctl chat --list
        llmctl chat --resume 3f2a
    """
    from llmctl import loader
    from llmctl.chat import ChatSession, Conversation, ConversationStore, SessionCache
    from llmctl.cli.chat_session import interactive, piped
    from llmctl.cli.options import (
        load_options,
        open_store,
        output_format,
        prompt_cache_file,
        system_prompt,
    )
    from llmctl.engines.text import GenerationOptions
    from llmctl.errors import UsageError
    from llmctl.store.layout import StoreLayout
    from llmctl.store.names import parse_reference

    out = Output(json_mode=json)
    store = ConversationStore(StoreLayout.default().root)
    if list_:
        return _list(out, store, model)
    output, took_stdin = output_format(format, json_schema)
    if took_stdin:
        raise UsageError("chat reads its messages from stdin", hint="give --json-schema a "
                         "file or the schema itself")
    options = GenerationOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                max_tokens=max_tokens, stop=tuple(stop or ()),
                                output=output).validate()
    system = system_prompt(system, system_file)
    cache_file = prompt_cache_file(prompt_cache, prompt_cache_ro)
    if no_cache and cache_file:
        raise UsageError("--no-cache and --prompt-cache ask for opposite things",
                         hint="leave out one of them")
    if sys.stdin is None:  # `llmctl chat MODEL <&-`: no terminal and no messages
        raise UsageError("stdin is closed, so there are no messages to answer",
                         hint="pipe them in (printf 'Hi\\n' | llmctl chat MODEL) or run chat "
                              "in a terminal")
    conversation = store.find(resume) if resume else None
    model = model or (conversation.model if conversation else None)
    if not model:
        raise UsageError("no model given", hint="llmctl chat MODEL, or --resume ID")
    ref = parse_reference(model)
    layout, catalog = open_store()
    with out.progress() as report:
        opened = loader.open_text(ref, layout, catalog, engine=engine, force=force,
                                  options=load_options(ctx, threads, gpu_layers, device, dtype,
                                                       trust_pickle, compute_unit),
                                  on_event=report, on_note=out.note)
    name = opened.model.name
    conversation = conversation or Conversation(name)
    conversation.model = name
    conversation.system = system or conversation.system
    session = ChatSession(opened.engine, conversation, options, store,
                          keep_cache=not no_cache)
    kv = SessionCache(opened, layout, cache_file, prompt_cache_ro, enabled=not no_cache)
    if cache_file or resume:
        kv.restore(conversation, out.note)
    meta = {"model": name, "engine": opened.spec.name, "backend": opened.engine.backend,
            "gpu_layers": opened.engine.gpu_layers}
    if not sys.stdin.isatty():
        piped(out, session, meta, verbose)
    else:
        from llmctl.transcript import Listener

        listener = Listener(listen_model, layout, catalog, on_note=out.note)
        session.listen = lambda path: listener.hear(path)[0]
        try:
            interactive(out, session, verbose, resumed=resume is not None)
        finally:
            listener.close()
    kv.save(session.conversation, out.note)


def _list(out: Output, store: ConversationStore, model: str | None) -> None:
    from datetime import datetime

    found = [c for c in store.list()
             if not model or model in (c.model, c.model.split(":")[0])]
    if not found and not out.json_mode:
        return out.info("no saved conversations; start one: llmctl chat MODEL")
    out.records(found, record=lambda c: c.summary(), name=lambda c: c.id,
                columns=("ID", "MODEL", "TURNS", "UPDATED", "FIRST MESSAGE"),
                row=lambda c: (c.id, c.model, str(len(c.turns)),
                               format_age(datetime.fromisoformat(c.updated).timestamp()),
                               c.first_line if len(c.first_line) <= 50
                               else c.first_line[:49] + "…"))
