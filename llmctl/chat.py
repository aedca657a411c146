"""Conversations: their history, fitting it into the context, saving and resuming them.

    $LLMCTL_HOME/conversations/<id>.json   one per conversation, rewritten atomically
                                           after every reply

A conversation keeps every turn; what goes to the model is the system prompt plus the
newest turns that leave room for the reply in the context. Turns left out stay left out
for the rest of the session (the note about them is given once), and stay in the file.

The engine's KV cache is kept between turns: each reply processes only what changed since
the last (`generate_from_tokens(keep_cache=True)`), and gives the same reply as processing
the whole conversation would. When the session ends, the cache is saved with the
conversation (`store.caches`), so that `--resume` does not process the history again.
"""

from __future__ import annotations

import json
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmctl.engines.text import (
    Done,
    Event,
    GenerationOptions,
    Message,
    Stats,
    TextEngine,
    Token,
)
from llmctl.errors import AmbiguousReference, InvalidName, StoreWarning, UsageError
from llmctl.loader import CacheUse, OnNote, Opened, restore_cache, save_cache
from llmctl.store.caches import conversation_cache
from llmctl.store.layout import StoreLayout, path_part, write_atomically

SCHEMA_VERSION = 1
BLOCK = '"""'  # starts and ends a multi-line message, as in Ollama
# The reply's room in the context when --max-tokens is not given: a quarter of it.
REPLY_SHARE = 4


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def new_id() -> str:
    return secrets.token_hex(4)


@dataclass
class Conversation:
    model: str
    system: str | None = None
    messages: list[Message] = field(default_factory=list)  # user, assistant, user, ...
    id: str = field(default_factory=new_id)
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)

    @property
    def turns(self) -> list[tuple[str, str]]:
        """(user, assistant) pairs."""
        texts = [m.content for m in self.messages]
        return list(zip(texts[0::2], texts[1::2], strict=False))

    @property
    def first_line(self) -> str:
        first = next((m.content for m in self.messages if m.role == "user"), "")
        return first.strip().splitlines()[0] if first.strip() else ""

    def summary(self) -> dict[str, Any]:
        """What `chat --list --json` shows of it."""
        return {"id": self.id, "model": self.model, "turns": len(self.turns),
                "created": self.created, "updated": self.updated, "system": self.system,
                "first": self.first_line}

    def add_turn(self, user: str, reply: str) -> None:
        self.messages += [Message("user", user), Message("assistant", reply)]
        self.updated = _now()

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "id": self.id, "model": self.model,
                "created": self.created, "updated": self.updated, "system": self.system,
                "messages": [{"role": m.role, "content": m.content} for m in self.messages]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Conversation:
        """A conversation from its JSON, checked (ValueError): the file may come from
        anywhere (`/load FILE`), and its ID becomes a file name under the store."""
        raw = data.get("messages", [])
        if not isinstance(raw, list) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in raw):
            raise ValueError("'messages' must be a list of {role, content} objects")
        messages = [Message(m["role"], m["content"]) for m in raw
                    if m.get("role") in ("user", "assistant")]
        system = data.get("system")
        # Files in the common [{"role": "system"}, ...] form keep their system prompt too.
        system = system or next((m["content"] for m in raw if m.get("role") == "system"),
                                None)
        strings = {key: data.get(key) for key in ("model", "created", "updated", "id")}
        if system is not None and not isinstance(system, str) or not all(
                v is None or isinstance(v, str) for v in strings.values()):
            raise ValueError("'model', 'system', 'id', 'created' and 'updated' must be text")
        identifier = data.get("id")
        try:
            path_part(identifier, "conversation ID")
        except InvalidName:
            # A file's "id" is only a label: the store names a conversation by its file
            # ("../../x" once made chat write outside the store), /load continues a file
            # under the session's ID. A missing or unusable one gets a fresh ID.
            identifier = new_id()
        return cls(model=data.get("model") or "", system=system, messages=messages,
                   id=identifier, created=data.get("created") or _now(),
                   updated=data.get("updated") or _now())


def write_conversation(conversation: Conversation, path: Path) -> None:
    text = json.dumps(conversation.to_dict(), indent=2, ensure_ascii=False) + "\n"
    write_atomically(path, text.encode(), sync=False)


def read_conversation(path: Path) -> Conversation:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return Conversation.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path} is not a saved conversation ({exc})") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise UsageError(f"{path} cannot be read ({exc.strerror})") from None


class ConversationStore:
    """The conversations under the store, by ID (a unique prefix of one will do). A
    stored conversation's ID is its file's name, whatever the file says."""

    def __init__(self, root: Path):
        self.folder = root / "conversations"

    def path(self, conversation_id: str) -> Path:
        return self.folder / f"{path_part(conversation_id, 'conversation ID')}.json"

    def save(self, conversation: Conversation) -> Path:
        path = self.path(conversation.id)
        write_conversation(conversation, path)
        return path

    def _read(self, path: Path) -> Conversation:
        conversation = read_conversation(path)
        conversation.id = path_part(path.stem, "conversation ID")
        return conversation

    def find(self, text: str) -> Conversation:
        path = self.path(text)  # an ID or a prefix is a name, never a path or a pattern
        if path.is_file():
            return self._read(path)
        matches = sorted(p.stem for p in self.folder.glob(f"{text}*.json"))
        if len(matches) > 1:
            raise AmbiguousReference(text, matches)
        if not matches:
            raise UsageError(f"no conversation '{text}'", hint="list them: llmctl chat --list")
        return self._read(self.path(matches[0]))

    def list(self) -> list[Conversation]:
        """Newest first; unreadable files are skipped (with a warning naming them)."""
        found = []
        for path in self.folder.glob("*.json"):
            try:
                found.append(self._read(path))
            except UsageError as exc:
                warnings.warn(StoreWarning(f"{exc}; skipped (delete it or fix it)"),
                              stacklevel=2)
        return sorted(found, key=lambda c: c.updated, reverse=True)


def load_conversation(store: ConversationStore, text: str) -> tuple[Conversation, bool]:
    """`/load FILE|ID`: a file (path) if one exists, else a stored conversation. The flag
    says whether it came from the store (then it is continued under its own ID)."""
    path = Path(text).expanduser()
    if path.is_file():
        return read_conversation(path), False
    return store.find(text), True


def read_message(first: str, more: Callable[[], str | None]) -> str:
    """A message from its first line: a line starting with \"\"\" opens a block that runs to
    the line ending with \"\"\" (or to the end of input)."""
    if not first.lstrip().startswith(BLOCK):
        return first
    text = first.lstrip()[len(BLOCK):]
    lines = []
    while not text.rstrip().endswith(BLOCK):
        lines.append(text)
        line = more()
        if line is None:
            return "\n".join(lines).strip()
        text = line
    lines.append(text.rstrip()[:-len(BLOCK)])
    return "\n".join(lines).strip()


# -- fitting the history into the context ---------------------------------------------------


@dataclass(frozen=True)
class Trimmed:
    """Turns were left out so that the history and the reply fit in the context."""

    dropped: int  # this time
    total_dropped: int  # in this session
    context_length: int

    @property
    def note(self) -> str:
        turns = f"the {self.dropped} oldest turns" if self.dropped > 1 else "the oldest turn"
        return (f"dropped {turns} to fit the history and the reply in the context "
                f"({self.context_length} tokens; --ctx raises it)")


ChatEvent = Trimmed | Event


def reply_room(context_length: int, max_tokens: int | None) -> int:
    """Tokens kept free for the reply."""
    if max_tokens:
        return min(max_tokens, context_length // 2)
    return context_length // REPLY_SHARE


class ChatSession:
    """One conversation with one loaded engine. `ask` streams the reply (a `Trimmed` event
    first when old turns had to go) and adds the turn to the conversation; the turn is kept
    when the reply is interrupted too, as far as it got, since that is what was shown."""

    def __init__(self, engine: TextEngine, conversation: Conversation,
                 options: GenerationOptions, store: ConversationStore | None = None,
                 keep_cache: bool = True):
        self.engine = engine
        self.conversation = conversation
        self.options = options
        self.store = store
        self.keep_cache = keep_cache  # reuse the KV cache of the turns before
        self.skipped = 0  # leading turns left out of the context
        self.last_stats: Stats | None = None  # the last reply's, for /stats
        # /listen: audio file -> its words (llmctl.transcript.Listener.hear); None: off.
        self.listen: Callable[[Path], str] | None = None

    def clear(self) -> None:
        """Start a new conversation, with the same model and system prompt."""
        old = self.conversation
        self.conversation = Conversation(old.model, old.system)
        self.skipped = 0

    def switch(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.skipped = 0

    def save(self) -> Path | None:
        return self.store.save(self.conversation) if self.store else None

    def _messages(self, user: str) -> list[Message]:
        conversation = self.conversation
        system = [Message("system", conversation.system)] if conversation.system else []
        kept = conversation.messages[2 * self.skipped:]
        return [*system, *kept, Message("user", user)]

    def _fit(self, user: str) -> Trimmed | None:
        count, context = self.engine.count_tokens, self.engine.context_length
        limit = context - reply_room(context, self.options.max_tokens)
        before = self.skipped
        while (self.skipped < len(self.conversation.turns)
               and count(self._messages(user)) > limit):
            self.skipped += 1
        if self.skipped == before:
            return None
        if count(self._messages(user)) >= context:
            # The message alone is too long: the engine will say so, and the history
            # stays for the next, shorter one.
            self.skipped = before
            return None
        return Trimmed(self.skipped - before, self.skipped, context)

    def ask(self, user: str) -> Iterator[ChatEvent]:
        trimmed = self._fit(user)
        if trimmed:
            yield trimmed
        parts: list[str] = []
        kept = False
        events = self.engine.generate(self._messages(user), self.options,
                                      keep_cache=self.keep_cache)
        try:
            for event in events:
                if isinstance(event, Token):
                    parts.append(event.text)
                elif isinstance(event, Done):
                    self._keep(user, parts)
                    self.last_stats = event.stats
                    kept = True
                yield event
        except (GeneratorExit, KeyboardInterrupt):
            events.close()
            if parts and not kept:
                self._keep(user, parts)
            raise

    def _keep(self, user: str, parts: list[str]) -> None:
        self.conversation.add_turn(user, "".join(parts))
        self.save()


@dataclass(frozen=True)
class SessionCache:
    """Where a chat session's KV cache is loaded from and saved to: the file the user
    named (`--prompt-cache`), else the conversation's own in the store (stored models
    only; none with `--no-cache`)."""

    opened: Opened[TextEngine]
    layout: StoreLayout
    file: Path | None = None
    read_only: bool = False
    enabled: bool = True

    def path(self, conversation: Conversation) -> Path | None:
        if self.file is not None or not self.enabled:
            return self.file
        manifest = self.opened.model.manifest
        if manifest is None or not self.opened.engine.saves_cache:
            return None
        return conversation_cache(self.layout, manifest.id, conversation.id)

    def restore(self, conversation: Conversation, on_note: OnNote) -> CacheUse | None:
        path = self.path(conversation)
        return restore_cache(self.opened, path, on_note) if path else None

    def save(self, conversation: Conversation, on_note: OnNote) -> CacheUse | None:
        path = self.path(conversation)
        if path is None or self.read_only or not conversation.turns:
            return None
        return save_cache(self.opened, path, on_note=on_note)


# -- slash commands -----------------------------------------------------------------------

HELP = """Commands:
  /set NAME VALUE   change an option for the next replies: temperature, top-p, top-k,
                    min-p, seed, max-tokens (seed and max-tokens: off to unset), stop
                    (TEXT, or off), format (json, or off), schema (FILE or the schema
                    itself, or off); /set alone shows them
  /stats            the last reply's figures
  /system [TEXT]    set the system prompt (without TEXT: show it)
  /clear            start a new conversation (this one stays saved)
  /save [FILE]      save the conversation (to FILE as JSON, else under the store)
  /load FILE|ID     load a conversation from a file or the store
  /listen FILE      transcribe the speech in FILE (--listen-model) and send it as your
                    next message
  /bye              quit (or Ctrl-D)
  /help             this list
A line starting with \"\"\" starts a multi-line message, ended by \"\"\"; Alt-Enter (or Esc
then Enter) adds a new line. Ctrl-C stops a reply."""


@dataclass(frozen=True)
class CommandResult:
    message: str  # for the person at the terminal
    error: bool = False
    stop: bool = False  # end the session
    show_history: bool = False  # a conversation was loaded: show it
    stats: Stats | None = None  # /stats: the figures to show
    send: str | None = None  # /listen: the text to send as the next message


# What /set changes: the name users type -> (GenerationOptions field, parser).
SETTABLE: dict[str, tuple[str, Callable[[str], Any]]] = {
    "temperature": ("temperature", float), "top-p": ("top_p", float),
    "top-k": ("top_k", int), "min-p": ("min_p", float),
    "seed": ("seed", lambda v: None if v == "off" else int(v)),
    "max-tokens": ("max_tokens", lambda v: None if v == "off" else int(v)),
    "stop": ("stop", lambda v: () if v == "off" else (v,)),
    "format": ("output", lambda v: None if v == "off" else _json_format(v)),
    "schema": ("output", lambda v: None if v == "off" else _schema_file(v)),
}


def _json_format(value: str) -> Any:
    from llmctl.engines.constraint import OutputFormat

    if value != "json":
        raise UsageError(f"unknown format '{value}'", hint="/set format json, or off")
    return OutputFormat().check()


def _schema_file(value: str) -> Any:
    from llmctl.engines.constraint import schema_from

    return schema_from(value, "/set schema")


def _shown(value: Any) -> str:
    if value is None or value == ():
        return "off"
    if hasattr(value, "schema"):  # an OutputFormat
        return "json" if value.schema is None else "schema"
    return " | ".join(map(repr, value)) if isinstance(value, tuple) else str(value)


def set_option(session: ChatSession, arg: str) -> CommandResult:
    """/set NAME VALUE: the options of the next replies, checked as the command line's
    are; /set alone: what they are."""
    options = session.options
    if not arg:
        shown = {name: getattr(options, field) for name, (field, _) in SETTABLE.items()
                 if name != "schema"}  # format shows the output's: json, schema or off
        return CommandResult("Options: " + ", ".join(
            f"{name} {_shown(value)}" for name, value in shown.items()))
    name, _, value = arg.partition(" ")
    if name not in SETTABLE or not value.strip():
        return CommandResult(f"/set takes one of: {', '.join(SETTABLE)}, and a value",
                             error=True)
    field, parse = SETTABLE[name]
    try:
        changed = replace(options, **{field: parse(value.strip())}).validate()
    except ValueError:
        return CommandResult(f"'{value.strip()}' is not a value for {name}", error=True)
    except UsageError as exc:
        return CommandResult(f"{exc}; {exc.hint}" if exc.hint else str(exc), error=True)
    session.options = changed
    return CommandResult(f"Set {name} to {value.strip()}.")


def run_command(session: ChatSession, text: str) -> CommandResult:
    """Carry out a slash command (`/save notes.json`) on the session."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    conversation = session.conversation
    if name in ("/bye", "/exit", "/quit"):
        return CommandResult("", stop=True)
    if name in ("/help", "/?"):
        return CommandResult(HELP)
    if name == "/set":
        return set_option(session, arg)
    if name == "/stats":
        if session.last_stats is None:
            return CommandResult("No reply yet.")
        return CommandResult("", stats=session.last_stats)
    if name == "/system":
        if not arg:
            return CommandResult(f"System prompt: {conversation.system or '(none)'}")
        conversation.system = arg
        return CommandResult("System prompt set.")
    if name == "/clear":
        session.clear()
        kept = f" The last one is saved as {conversation.id}." if conversation.turns else ""
        return CommandResult(f"Cleared: a new conversation starts.{kept}")
    if name == "/save":
        if arg:
            write_conversation(conversation, Path(arg).expanduser())
            return CommandResult(f"Saved to {arg}.")
        session.save()
        return CommandResult(f"Saved as {conversation.id}.")
    if name == "/load":
        if not arg or session.store is None:
            return CommandResult("/load needs a file or a conversation ID", error=True)
        loaded, stored = load_conversation(session.store, arg)
        if stored:
            session.switch(loaded)
        else:  # a file's turns continue under this session's ID
            conversation.messages, conversation.system = loaded.messages, loaded.system
            session.switch(conversation)
        return CommandResult(f"Loaded {len(loaded.turns)} turn(s).", show_history=True)
    if name == "/listen":
        if not arg:
            return CommandResult("/listen needs an audio file: /listen memo.m4a", error=True)
        if session.listen is None:
            return CommandResult("/listen has no speech model here", error=True)
        text = session.listen(Path(arg).expanduser())
        return CommandResult(f"(heard) {text}", send=text)
    return CommandResult(f"unknown command '{name}'; type /help", error=True)
