"""chat's conversation in a terminal (line editing, history, slash commands), and the
reply streamed to stdout that the terminal and piped chat share."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from llmctl.cli.output import Output

if TYPE_CHECKING:
    from llmctl.chat import ChatSession
    from llmctl.engines.text import Stats


def stream_reply(out: Output, session: ChatSession, text: str, meta: dict | None = None
            ) -> Stats:
    """One reply, streamed to stdout (as JSON events when `out.json_mode`)."""
    from llmctl.chat import Trimmed
    from llmctl.engines.text import Done

    parts = []
    events = session.ask(text)
    try:
        for event in events:
            if isinstance(event, Trimmed):
                out.info(f"note: {event.note}")
            elif isinstance(event, Done):
                record = {**(meta or {}), "conversation": session.conversation.id,
                          "turn": len(session.conversation.turns), "text": "".join(parts),
                          **event.stats.to_dict()}
                if session.options.output is not None:  # whole and valid: enforced
                    import json

                    record["value"] = json.loads(record["text"])
                out.reply_done(record)
                return event.stats
            else:
                parts.append(event.text)
                out.token(event.text)
    finally:
        events.close()  # an interrupted reply is kept as far as it got
    raise AssertionError("the engine ended its stream without a Done event")


def interactive(out: Output, session: ChatSession, verbose: bool, resumed: bool) -> None:
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
                if done.stats:
                    out.stats(done.stats, session.engine)
                if done.stop:
                    break
                if done.send:
                    stats = stream_reply(out, session, done.send)
                    if verbose:
                        out.stats(stats, session.engine)
            elif text:
                stats = stream_reply(out, session, text)
                if verbose:
                    out.stats(stats, session.engine)
        except KeyboardInterrupt:
            out.reply_stopped()
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


def piped(out: Output, session: ChatSession, meta: dict, verbose: bool) -> None:
    """Scripts: each line (or \"\"\"-block) of stdin is a message, read as it comes, so
    that a program can hold a conversation through a pipe."""
    from llmctl.chat import read_message
    from llmctl.cli.options import text_stdin

    text_stdin()

    def more() -> str | None:
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None

    while (line := sys.stdin.readline()):
        text = read_message(line.rstrip("\n"), more).strip()
        if not text:
            continue
        try:
            stats = stream_reply(out, session, text, meta)
        except KeyboardInterrupt:
            out.reply_stopped()  # the shell prompt on a line of its own
            raise
        if verbose:
            out.stats(stats, session.engine)
