"""llmctl chat: a conversation in the terminal, or one reply per line of piped input."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llmctl.cli import run as shared  # the options chat shares with run
from llmctl.cli.common import JsonOpt, complete_model
from llmctl.cli.output import Output
from llmctl.units import format_age

if TYPE_CHECKING:
    from llmctl.chat import ChatSession, ConversationStore
    from llmctl.engines.base import Stats


def chat(
    model: Annotated[str | None, typer.Argument(
        metavar="[MODEL]", help="A model: NAME[:TAG], a .gguf path or an ID prefix "
        "(with --resume, the conversation's model by default).",
        autocompletion=complete_model, show_default=False)] = None,
    system: shared.SystemOpt = None,
    resume: Annotated[str | None, typer.Option(
        metavar="ID", help="Continue a saved conversation (an ID or a unique prefix).",
        show_default=False)] = None,
    list_: Annotated[bool, typer.Option(
        "--list", help="List saved conversations (newest first) and exit.")] = False,
    temperature: shared.TemperatureOpt = 0.8,
    top_p: shared.TopPOpt = 0.95,
    top_k: shared.TopKOpt = 40,
    seed: shared.SeedOpt = None,
    max_tokens: shared.MaxTokensOpt = None,
    ctx: shared.CtxOpt = None,
    threads: shared.ThreadsOpt = None,
    engine: shared.EngineOpt = None,
    json: JsonOpt = False,
    verbose: shared.VerboseOpt = False,
    force: shared.ForceOpt = False,
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

    Examples:

    \b
        llmctl chat smollm2
        llmctl chat smollm2 --system "Answer in French." --temperature 0
        printf 'Hi\\nBye\\n' | llmctl chat smollm2 --json | jq -r 'select(.type=="done").text'
        llmctl chat --list
        llmctl chat --resume 3f2a
    """
    from llmctl.chat import ChatSession, Conversation, ConversationStore
    from llmctl.engines.base import GenerationOptions
    from llmctl.errors import UsageError
    from llmctl.store.layout import StoreLayout

    out = Output(json_mode=json)
    store = ConversationStore(StoreLayout.default().root)
    if list_:
        return _list(out, store, model, json)
    options = GenerationOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                max_tokens=max_tokens).validate()
    if sys.stdin is None:  # `llmctl chat MODEL <&-`: no terminal and no messages
        raise UsageError("stdin is closed, so there are no messages to answer",
                         hint="pipe them in (printf 'Hi\\n' | llmctl chat MODEL) or run chat "
                              "in a terminal")
    conversation = store.find(resume) if resume else None
    model = model or (conversation.model if conversation else None)
    if not model:
        raise UsageError("no model given", hint="llmctl chat MODEL, or --resume ID")
    target, spec, llm = shared.open_text_model(out, model, engine=engine, ctx=ctx,
                                               threads=threads, force=force)
    conversation = conversation or Conversation(target.name)
    conversation.model = target.name
    conversation.system = system or conversation.system
    session = ChatSession(llm, conversation, options, store)
    meta = {"model": target.name, "engine": spec.name}
    if not sys.stdin.isatty():
        return _piped(out, session, meta, verbose)
    _interactive(out, session, verbose, resumed=resume is not None)


def _list(out: Output, store: ConversationStore, model: str | None, json: bool) -> None:
    from datetime import datetime

    found = [c for c in store.list()
             if not model or model in (c.model, c.model.split(":")[0])]
    if json:
        return out.json([c.summary() for c in found])
    if not found:
        return out.info("no saved conversations; start one: llmctl chat MODEL")
    out.table(("ID", "MODEL", "TURNS", "UPDATED", "FIRST MESSAGE"), [
        (c.id, c.model, str(len(c.turns)),
         format_age(datetime.fromisoformat(c.updated).timestamp()),
         c.first_line if len(c.first_line) <= 50 else c.first_line[:49] + "…")
        for c in found])


def _stream(out: Output, session: ChatSession, text: str, meta: dict | None = None
            ) -> Stats:
    """One reply, streamed to stdout (as JSON events when `out.json_mode`)."""
    from llmctl.chat import Trimmed
    from llmctl.engines.base import Done

    parts = []
    events = session.ask(text)
    try:
        for event in events:
            if isinstance(event, Trimmed):
                out.info(f"note: {event.note}")
            elif isinstance(event, Done):
                if out.json_mode:
                    out.json_line({"type": "done", **(meta or {}),
                                   "conversation": session.conversation.id,
                                   "turn": len(session.conversation.turns),
                                   "text": "".join(parts), **event.stats.to_dict()})
                else:
                    out.text("\n")
                return event.stats
            elif out.json_mode:
                parts.append(event.text)
                out.json_line({"type": "token", "text": event.text})
            else:
                out.text(event.text)
    finally:
        events.close()  # an interrupted reply is kept as far as it got
    raise AssertionError("the engine ended its stream without a Done event")


def _piped(out: Output, session: ChatSession, meta: dict, verbose: bool) -> None:
    """Scripts: each line (or \"\"\"-block) of stdin is a message, read as it comes, so
    that a program can hold a conversation through a pipe."""
    from llmctl.chat import read_message

    shared.text_stdin()

    def more() -> str | None:
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None

    while (line := sys.stdin.readline()):
        text = read_message(line.rstrip("\n"), more).strip()
        if not text:
            continue
        try:
            stats = _stream(out, session, text, meta)
        except KeyboardInterrupt:
            out.text("" if out.json_mode else "\n")  # the shell prompt on a line of its own
            raise
        if verbose:
            shared.report_stats(out, stats, getattr(session.engine, "threads", None))


def _interactive(out: Output, session: ChatSession, verbose: bool, resumed: bool) -> None:
    from llmctl.chat import read_message, run_command
    from llmctl.cli import errors
    from llmctl.errors import LlmctlError

    terminal = _terminal(session)
    if resumed:
        _show_history(out, session)
    out.info(f"Chatting with {session.conversation.model}. /help for commands, "
             "/bye or Ctrl-D to quit.")
    while True:
        try:
            text = read_message(terminal.prompt(">>> "), lambda: terminal.prompt("... "))
        except KeyboardInterrupt:
            out.info("(Ctrl-D or /bye to quit)")
            continue
        except EOFError:
            break
        text = text.strip()
        try:
            if text.startswith("/"):
                done = run_command(session, text)
                if done.show_history:
                    _show_history(out, session)
                if done.message:
                    (out.error if done.error else out.info)(done.message)
                if done.stop:
                    break
            elif text:
                stats = _stream(out, session, text)
                if verbose:
                    shared.report_stats(out, stats, getattr(session.engine, "threads", None))
        except KeyboardInterrupt:
            out.text("\n")
            out.info("(reply stopped)")
        except LlmctlError as exc:  # e.g. a message longer than the context: say so, go on
            out.error(errors.describe(exc)[1])
    if session.conversation.turns:
        out.info(f"Saved; continue with: llmctl chat --resume {session.conversation.id}")


def _terminal(session: ChatSession) -> Any:  # a prompt_toolkit PromptSession
    """Line editing, history across sessions, Alt-Enter for a new line. The prompt goes
    where a person sees it: stdout, or stderr when stdout is redirected."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.output import create_output

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    @keys.add("c-c")
    def _interrupt(event: Any) -> None:
        if event.current_buffer.text:  # Ctrl-C on a typed line drops the line
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt())

    folder = session.store.folder if session.store else None
    history = None
    if folder:
        folder.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(folder / "input-history.txt"))
    stream = sys.stdout if sys.stdout.isatty() else sys.stderr
    return PromptSession(history=history, key_bindings=keys,
                         output=create_output(stdout=stream))


def _show_history(out: Output, session: ChatSession) -> None:
    conversation = session.conversation
    if conversation.system:
        out.info(f"(system: {conversation.system})")
    for user, reply in conversation.turns:
        out.line(f">>> {user}\n{reply}\n")
