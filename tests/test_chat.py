"""`llmctl chat`: in a real pseudo-terminal as a person types, through pipes as scripts do,
on the real SmolLM2 model; and the conversation library underneath."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PARIS, Runner, error_line, llmctl_executable

from llmctl.chat import (
    ChatSession,
    Conversation,
    ConversationStore,
    Trimmed,
    read_message,
    run_command,
)
from llmctl.engines.text import Done, GenerationOptions, Message, Stats, Token
from llmctl.errors import AmbiguousReference, UsageError

pexpect = pytest.importorskip("pexpect", reason="pexpect drives chat in a pseudo-terminal "
                                                "(pip install -e '.[dev]')")
PARIS_ANSWER = "The capital of France is Paris."
# The tests see the terminal as a person does; no terminal answers prompt_toolkit's cursor
# position queries here, so it is told not to ask rather than wait for each reply.
TERMINAL_ENV = {"PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm"}


def spawn(*args: str, cwd: Path) -> pexpect.spawn:
    child = pexpect.spawn(llmctl_executable(), list(args), cwd=str(cwd), encoding="utf-8",
                          env={**os.environ, **TERMINAL_ENV}, dimensions=(40, 200),
                          timeout=120)
    return child


def ask(child: pexpect.spawn, line: str, *expected: str) -> None:
    """Type a line, then wait for the expected text and the end of the reply (--verbose
    prints statistics after each one), so that the next line is typed at the prompt."""
    child.sendline(line)
    for text in expected:
        child.expect_exact(text)
    child.expect_exact("peak memory")
    child.expect_exact(">>>")


def command(child: pexpect.spawn, line: str, expected: str) -> None:
    child.sendline(line)
    child.expect_exact(expected)
    child.expect_exact(">>>")


def test_a_conversation_in_the_terminal_is_saved_resumed_and_listed(
        llmctl: Runner, tmp_path: Path) -> None:
    child = spawn("chat", "smollm2", "--temperature", "0", "--max-tokens", "40", "--verbose",
                  cwd=tmp_path)
    child.expect_exact("/help")
    child.expect_exact(">>>")
    ask(child, PARIS, PARIS_ANSWER)
    command(child, "/system You are a pirate called Captain Flint.", "System prompt set")
    ask(child, "What is your name?", "Flint")
    command(child, "/save saved.json", "Saved to saved.json")
    child.sendline("/bye")
    child.expect_exact("llmctl chat --resume ")
    conversation_id = child.readline().strip()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    saved = json.loads((tmp_path / "saved.json").read_text())
    assert saved["id"] == conversation_id and saved["model"] == "smollm2:135m"
    assert saved["system"] == "You are a pirate called Captain Flint."
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2
    assert saved["messages"][0]["content"] == PARIS
    assert saved["messages"][1]["content"] == PARIS_ANSWER
    assert "Flint" in saved["messages"][3]["content"]

    # Resumed: the history is shown first, and the model remembers it.
    child = spawn("chat", "smollm2", "--resume", conversation_id[:5], "--temperature", "0",
                  "--max-tokens", "40", "--verbose", cwd=tmp_path)
    child.expect_exact(f">>> {PARIS}")
    child.expect_exact(PARIS_ANSWER)
    child.expect_exact(">>>")
    ask(child, "Which city did you name in your first answer?", "Paris")
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    listed = llmctl("chat", "--list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["ID", "MODEL", "TURNS", "UPDATED", "FIRST", "MESSAGE"]
    assert row.startswith(conversation_id) and "smollm2:135m" in row
    assert " 3 " in row and "What is the capital of France?" in row
    entry, = json.loads(llmctl("chat", "--list", "--json").stdout)
    assert entry["id"] == conversation_id and entry["turns"] == 3
    assert entry["first"] == PARIS


def test_keys_blocks_and_commands_in_the_terminal(tmp_path: Path) -> None:
    child = spawn("chat", "smollm2", "--temperature", "0", "--max-tokens", "1000",
                  "--verbose", cwd=tmp_path)
    child.expect_exact(">>>")
    # Ctrl-C during a reply stops the reply, not the session.
    child.sendline("Write a very long story about a dragon who learns to bake bread.")
    child.expect_exact("Once upon a time")  # the reply has started
    child.sendcontrol("c")
    child.expect_exact("(reply stopped)")
    child.expect_exact(">>>")
    # A multi-line message between triple quotes is one turn.
    child.sendline('"""')
    child.sendline("What is the capital of France?")
    child.sendline('Answer in one sentence."""')
    child.expect_exact(PARIS_ANSWER)
    child.expect_exact("peak memory")
    child.expect_exact(">>>")
    # Ctrl-C at an empty prompt says how to quit.
    child.sendcontrol("c")
    child.expect_exact("Ctrl-D or /bye")
    command(child, "/help", "/save [FILE]")
    command(child, "/nonsense", "unknown command '/nonsense'")
    command(child, "/system", "System prompt: (none)")
    ask(child, "What is 2+2? Answer with the number only.")
    command(child, "/clear", "Cleared")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    store = ConversationStore(Path(os.environ["LLMCTL_HOME"]))
    (conversation,) = store.list()  # /clear started a new one, which has no turns
    assert conversation.turns[0][1].startswith("Once upon a time")  # as far as it got
    assert conversation.turns[1] == (
        "What is the capital of France?\nAnswer in one sentence.", PARIS_ANSWER)
    assert len(conversation.turns) == 3 and "4" in conversation.turns[2][1]


def test_piped_lines_are_turns_and_replies_go_to_stdout(llmctl: Runner) -> None:
    lines = [PARIS, "What is 2+2? Answer with the number only.",
             "Which city did you name in your first answer?"]
    result = llmctl("chat", "smollm2", "--temperature", "0", "--max-tokens", "30",
                    input="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    replies = result.stdout.splitlines()
    assert len(replies) == 3, result.stdout
    assert replies[0] == PARIS_ANSWER
    assert "4" in replies[1] or "four" in replies[1]
    assert "Paris" in replies[2]
    assert ">>>" not in result.stdout and "\x1b" not in result.stdout + result.stderr


def test_piped_json_gives_run_events_and_a_reply_per_done(llmctl: Runner) -> None:
    result = llmctl("chat", "smollm2", "--temperature", "0", "--max-tokens", "30", "--json",
                    "--system", "You are a pirate called Captain Flint.",
                    input=f"{PARIS}\n\nWhat is your name?\n")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    done = [e for e in events if e["type"] == "done"]
    assert len(done) == 2 and events[-1] is done[-1]
    assert {e["type"] for e in events} == {"token", "done"}
    first_tokens = events[:events.index(done[0])]
    assert "".join(e["text"] for e in first_tokens) == done[0]["text"]
    assert done[0]["generated_tokens"] == len(first_tokens)
    assert "Paris" in done[0]["text"] and "Flint" in done[1]["text"]
    assert [d["turn"] for d in done] == [1, 2]
    assert done[0]["conversation"] == done[1]["conversation"]
    assert done[0]["model"] == "smollm2:135m" and done[0]["engine"] == "llama"
    assert done[1]["prompt_tokens"] > done[0]["prompt_tokens"]  # the history is sent
    # stderr has the notes of the first pull, nothing else.
    assert all(line.startswith("smollm2:135m: ") for line in result.stderr.splitlines())


def test_a_small_context_drops_the_oldest_turns_with_a_note(llmctl: Runner) -> None:
    turns = [f"Tell me a fact about the number {n}. Write three sentences with details."
             for n in range(1, 6)]
    result = llmctl("chat", "smollm2", "--temperature", "0", "--ctx", "256",
                    "--max-tokens", "60", "--json", input="\n".join(turns) + "\n")
    assert result.returncode == 0, result.stderr
    assert "note: dropped the" in result.stderr and "256 tokens" in result.stderr
    done = [e for e in map(json.loads, result.stdout.splitlines()) if e["type"] == "done"]
    assert len(done) == 5 and all(d["text"] for d in done)
    assert max(d["prompt_tokens"] + d["generated_tokens"] for d in done) <= 256


def test_memory_guard_refuses_chat_unless_forced(llmctl: Runner) -> None:
    env = {"LLMCTL_MEMORY_LIMIT": "10M"}
    refused = llmctl("chat", "smollm2", input=f"{PARIS}\n", env=env)
    assert refused.returncode == 5
    assert "need" in error_line(refused) and "--force" in error_line(refused)
    forced = llmctl("chat", "smollm2", "--force", "--temperature", "0", input=f"{PARIS}\n",
                    env=env)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout == PARIS_ANSWER + "\n"


def test_resume_and_model_errors(llmctl: Runner) -> None:
    missing = llmctl("chat", "smollm2", "--resume", "abc")
    assert missing.returncode == 2 and "no conversation 'abc'" in error_line(missing)
    nothing = llmctl("chat")
    assert nothing.returncode == 2 and "no model" in error_line(nothing)
    empty = llmctl("chat", "--list")
    assert empty.returncode == 0 and empty.stdout == "" and "no saved" in empty.stderr
    assert llmctl("chat", "--list", "--json").stdout.strip() == "[]"


# -- the library, with a stand-in engine that counts words as tokens --------------------


class WordEngine:
    """Replies with a fixed text; one token per word; a context of `context_length`."""

    name = "words"

    def __init__(self, reply: str = "fine thanks", context_length: int = 100):
        self.reply = reply
        self.context_length = context_length
        self.prompts: list[list[Message]] = []

    def count_tokens(self, messages: list[Message]) -> int:
        return sum(len(m.content.split()) for m in messages)

    def generate(self, messages: list[Message], options: GenerationOptions, *,
                 keep_cache: bool = False) -> Iterator[Token | Done]:
        self.prompts.append(messages)
        self.kept_cache = keep_cache
        words = self.reply.split()
        for word in words:
            yield Token(word + " ")
        yield Done(Stats(self.count_tokens(messages), len(words), 0.0, 0.0, "stop"))

    def close(self) -> None:
        pass


def test_read_message_joins_a_triple_quoted_block() -> None:
    rest = iter(["second line", 'third"""', "not read"])
    assert read_message('"""first', lambda: next(rest)) == "first\nsecond line\nthird"
    assert read_message('"""one line"""', lambda: None) == "one line"
    assert read_message("plain", lambda: "never") == "plain"
    assert read_message('"""unfinished', iter(["x", None]).__next__) == "unfinished\nx"


def test_old_turns_are_dropped_to_leave_room_for_the_reply(tmp_path: Path) -> None:
    engine = WordEngine(context_length=40)  # max_tokens 10 leaves 30 for the prompt
    session = ChatSession(engine, Conversation("m:1", system="be brief"),
                          GenerationOptions(max_tokens=10), ConversationStore(tmp_path))
    for n in range(4):
        events = list(session.ask(f"question {n} " + "word " * 6))
        trimmed = [e for e in events if isinstance(e, Trimmed)]
        assert bool(trimmed) == (n >= 3), n
    assert trimmed[0].dropped == 1 and trimmed[0].total_dropped == 1
    sent = engine.prompts[-1]
    assert sent[0] == Message("system", "be brief")  # the system prompt always stays
    assert sent[1].content.startswith("question 1")
    assert engine.count_tokens(sent) <= 30
    # The file keeps every turn.
    saved = ConversationStore(tmp_path).find(session.conversation.id)
    assert len(saved.turns) == 4 and saved.system == "be brief"
    # A message too long on its own drops nothing (the engine refuses it).
    assert not [e for e in session.ask("word " * 50) if isinstance(e, Trimmed)]
    assert session.skipped == 1


def test_an_interrupted_reply_is_kept_as_far_as_it_got(tmp_path: Path) -> None:
    session = ChatSession(WordEngine("one two three four"), Conversation("m:1"),
                          GenerationOptions(), ConversationStore(tmp_path))
    events = session.ask("count")
    next(events), next(events)
    events.close()  # what the terminal does on Ctrl-C
    assert session.conversation.turns == [("count", "one two ")]


def test_store_finds_by_prefix_and_lists_newest_first(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    for cid, updated in (("aa11", "2025-01-01T00:00:00+00:00"),
                         ("aa22", "2025-02-01T00:00:00+00:00")):
        conversation = Conversation("m:1", id=cid, updated=updated)
        conversation.messages = [Message("user", "hi"), Message("assistant", "hello")]
        conversation.updated = updated
        store.save(conversation)
    assert [c.id for c in store.list()] == ["aa22", "aa11"]
    assert store.find("aa1").id == "aa11"
    with pytest.raises(AmbiguousReference):
        store.find("aa")
    with pytest.raises(UsageError):
        store.find("zz")
    (tmp_path / "conversations" / "broken.json").write_text("{")
    assert len(store.list()) == 2  # a damaged file does not hide the others


def test_commands_change_the_session(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    session = ChatSession(WordEngine(), Conversation("m:1"), GenerationOptions(), store)
    list(session.ask("hello"))
    assert run_command(session, "/system Talk like a pirate.").message == "System prompt set."
    assert session.conversation.system == "Talk like a pirate."
    assert "/load" in run_command(session, "/help").message
    assert run_command(session, "/save " + str(tmp_path / "x.json")).message.startswith("Saved")
    first = session.conversation.id
    run_command(session, "/clear")
    assert session.conversation.id != first and session.conversation.turns == []
    assert session.conversation.system == "Talk like a pirate."
    loaded = run_command(session, "/load " + str(tmp_path / "x.json"))
    assert loaded.show_history and session.conversation.turns == [("hello", "fine thanks ")]
    assert session.conversation.id != first  # a file continues under this session's ID
    run_command(session, "/load " + first)
    assert session.conversation.id == first  # a stored one continues under its own
    assert run_command(session, "/load").error
    assert run_command(session, "/bye").stop
    assert run_command(session, "/what").error


@pytest.mark.parametrize("args", [("--help",), ("chat", "--help"), ("chat", "--list")])
def test_chat_help_and_list_import_nothing_heavy(args: tuple[str, ...]) -> None:
    from test_startup import HEAVY, imported_modules

    modules = imported_modules(*args)
    assert not modules & (HEAVY | {"prompt_toolkit"}), modules & (HEAVY | {"prompt_toolkit"})


def test_set_changes_the_next_replies_options_and_stats_shows_the_last(tmp_path: Path
                                                                       ) -> None:
    session = ChatSession(WordEngine(), Conversation("m:1"), GenerationOptions(),
                          ConversationStore(tmp_path))
    assert run_command(session, "/stats").message == "No reply yet."
    assert run_command(session, "/set temperature 0.2").message == "Set temperature to 0.2."
    assert session.options.temperature == 0.2
    run_command(session, "/set seed 7")
    run_command(session, "/set stop END")
    assert (session.options.seed, session.options.stop) == (7, ("END",))
    shown = run_command(session, "/set").message
    assert "temperature 0.2" in shown and "seed 7" in shown and "stop 'END'" in shown
    run_command(session, "/set seed off")
    assert session.options.seed is None
    for bad in ("/set temperature hot", "/set top-p 2", "/set colour blue", "/set top-k"):
        result = run_command(session, bad)
        assert result.error, bad
    assert session.options.top_p == 0.95  # a refused value changes nothing
    list(session.ask("hello"))
    stats = run_command(session, "/stats").stats
    assert stats is not None and stats.generated_tokens > 0
    assert run_command(session, "/set format json").message == "Set format to json."
    assert session.options.output is not None and session.options.output.schema is None
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "integer"}}}')
    run_command(session, f"/set schema {schema}")
    assert session.options.output.schema["properties"]["a"] == {"type": "integer"}
    assert "format schema" in run_command(session, "/set").message
    assert run_command(session, "/set schema /nonexistent.json").error
    assert run_command(session, "/set format yaml").error
    run_command(session, "/set format off")
    assert session.options.output is None
