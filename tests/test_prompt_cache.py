"""Prompt caching on the real SmolLM2 (llama.cpp) and its MLX conversion: chat keeps its
KV cache between turns, `--prompt-cache FILE` keeps a prompt's state between runs, and a
reply is the same, token for token at temperature 0, as without the cache."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import Runner, error_line, llmctl_executable

from llmctl.engines.prompt_cache import FORMAT_VERSION, CacheIdentity, CacheRefused, read
from llmctl.engines.text import GenerationOptions, LoadOptions

GREEDY = ["--temperature", "0"]
# A system prompt long enough (more than 64 tokens) for the first turn's state to be kept.
SYSTEM = ("You are a patient cycling mechanic who explains things to beginners. You answer "
          "in plain words, you give one concrete example for every idea, and you never "
          "use more than three short paragraphs. When you are not sure of a fact you say "
          "so, and you suggest how the person could check it for themselves at home.")
TURNS = ["Tell me about the history of the bicycle.", "Now explain how gears work on it.",
         "What about brakes? Compare rim and disc brakes.",
         "Summarise everything so far in a list.",
         "Write a short poem about cycling in the rain."]
DOCUMENT = " ".join(
    f"Section {i}. The harbour office logs every ship that enters: its name, its cargo, "
    f"the berth it is given and the hour it leaves. Ships carrying grain use berth {i % 7}."
    for i in range(1, 36))


def done_events(stdout: str) -> list[dict]:
    return [e for e in map(json.loads, stdout.splitlines()) if e["type"] == "done"]


def chat(llmctl: Runner, *args: str, turns: list[str] = TURNS) -> list[dict]:
    result = llmctl("chat", "smollm2", *GREEDY, "--json", *args, input="\n".join(turns) + "\n")
    assert result.returncode == 0, result.stderr
    events = done_events(result.stdout)
    assert len(events) == len(turns)
    return events


# -- chat: the KV cache between turns ------------------------------------------------------


def test_chat_turns_process_only_what_is_new_and_reply_as_without_the_cache(
        llmctl: Runner) -> None:
    cached = chat(llmctl, "--system", SYSTEM, "--max-tokens", "80")
    whole = chat(llmctl, "--system", SYSTEM, "--max-tokens", "80", "--no-cache")
    assert [e["text"] for e in cached] == [e["text"] for e in whole]
    assert "bicycle" in cached[0]["text"].lower()
    assert all(e["cached_tokens"] == 0 for e in whole)
    assert cached[0]["cached_tokens"] == 0
    for before, turn in zip(cached, cached[1:], strict=False):
        # The turn before's prompt is kept (less at most one micro-batch of 64 tokens,
        # processed again so that the state is exact); its reply and the new message are
        # what is processed.
        assert before["prompt_tokens"] - 64 <= turn["cached_tokens"] <= before["prompt_tokens"]
        assert turn["processed_tokens"] == turn["prompt_tokens"] - turn["cached_tokens"]
        new = turn["prompt_tokens"] - before["prompt_tokens"]
        assert turn["processed_tokens"] <= new + 64


def test_a_trimmed_history_keeps_the_replies_of_a_chat_without_the_cache(
        llmctl: Runner) -> None:
    args = ["--system", SYSTEM, "--max-tokens", "60", "--ctx", "400"]
    result = llmctl("chat", "smollm2", *GREEDY, "--json", *args, input="\n".join(TURNS))
    assert result.returncode == 0, result.stderr
    assert "dropped the oldest turn" in result.stderr  # the history did not fit
    cached = done_events(result.stdout)
    whole = chat(llmctl, *args, "--no-cache")
    assert [e["text"] for e in cached] == [e["text"] for e in whole]
    # After a trim the system prompt is still the common prefix: kept, not processed again.
    assert any(e["cached_tokens"] for e in cached[2:])


def test_resume_loads_the_cache_saved_with_the_conversation(
        llmctl: Runner, llmctl_home: Path) -> None:
    first = chat(llmctl, "--system", SYSTEM, "--max-tokens", "40", turns=TURNS[:3])
    conversation = first[0]["conversation"]
    saved = list((llmctl_home / "caches").glob(f"*/{conversation}.kv"))
    assert len(saved) == 1 and saved[0].stat().st_size > 0
    resumed = chat(llmctl, "--resume", conversation, "--max-tokens", "40", turns=TURNS[3:4])
    assert resumed[0]["cached_tokens"] >= first[-1]["prompt_tokens"] - 64
    # The same four turns in one session without any cache: the same fourth reply.
    whole = chat(llmctl, "--system", SYSTEM, "--max-tokens", "40", "--no-cache",
                 turns=TURNS[:4])
    assert resumed[0]["text"] == whole[3]["text"]
    assert [e["text"] for e in first] == [e["text"] for e in whole[:3]]

    # The caches count in the store's size, and go with their model.
    listed = llmctl("ls")
    assert "of prompt caches" in listed.stderr
    assert llmctl("rm", "-y", "smollm2").returncode == 0
    assert not list((llmctl_home / "caches").glob("*/*.kv"))


def test_rm_caches_deletes_them_and_keeps_the_models(llmctl: Runner, llmctl_home: Path) -> None:
    chat(llmctl, "--system", SYSTEM, "--max-tokens", "10", turns=TURNS[:1])
    assert list((llmctl_home / "caches").glob("*/*.kv"))
    dry = llmctl("rm", "--caches", "--dry-run")
    assert "would delete 1 prompt cache(s)" in dry.stderr
    assert llmctl("rm", "--caches").returncode == 2  # no -y in a script
    done = llmctl("rm", "--caches", "-y")
    assert done.returncode == 0 and "deleted 1 prompt cache(s)" in done.stderr
    assert not list((llmctl_home / "caches").glob("*/*.kv"))
    assert "smollm2:135m" in llmctl("ls").stdout


# -- run --prompt-cache FILE ---------------------------------------------------------------


def run(llmctl: Runner, question: str, *args: str) -> tuple[dict, str, str]:
    result = llmctl("run", "smollm2", *GREEDY, "--max-tokens", "24", "--json", *args,
                    input=DOCUMENT + "\n\n" + question)
    assert result.returncode == 0, result.stderr
    done = done_events(result.stdout)[0]
    return done, done["text"] if "text" in done else _text(result.stdout), result.stderr


def _text(stdout: str) -> str:
    return "".join(e["text"] for e in map(json.loads, stdout.splitlines())
                   if e["type"] == "token")


def test_a_second_run_loads_the_prompt_cache_and_answers_as_without_it(
        llmctl: Runner, tmp_path: Path) -> None:
    cache = tmp_path / "harbour.kv"
    first, first_text, _ = run(llmctl, "Which berth do grain ships use?", "--prompt-cache",
                               str(cache))
    assert first["prompt_cache"] == {"file": str(cache), "loaded_tokens": 0,
                                     "load_seconds": 0.0, "saved": True}
    assert first["cached_tokens"] == 0 and cache.stat().st_size > 0
    question = "What does the harbour office log?"
    second, second_text, _ = run(llmctl, question, "--prompt-cache", str(cache))
    plain, plain_text, _ = run(llmctl, question)
    assert second_text == plain_text
    assert second["prompt_cache"]["loaded_tokens"] > 700
    # The document is kept; the question (and at most one micro-batch) is processed.
    assert second["cached_tokens"] >= second["prompt_tokens"] - 80
    assert plain["cached_tokens"] == 0 and "prompt_cache" not in plain

    # --prompt-cache-ro loads and leaves the file as it was.
    before = hashlib.sha256(cache.read_bytes()).hexdigest()
    ro, ro_text, _ = run(llmctl, "Which berth do grain ships use?", "--prompt-cache",
                         str(cache), "--prompt-cache-ro")
    assert ro_text == first_text and ro["prompt_cache"]["saved"] is False
    assert ro["cached_tokens"] > 700
    assert hashlib.sha256(cache.read_bytes()).hexdigest() == before

    verbose = llmctl("run", "smollm2", *GREEDY, "--max-tokens", "4", "--verbose",
                     "--prompt-cache", str(cache), input=DOCUMENT + "\n\n" + question)
    assert "from the cache" in verbose.stderr


def test_prompt_cache_ro_needs_a_file_and_no_cache_refuses_one(llmctl: Runner) -> None:
    result = llmctl("run", "smollm2", "--prompt-cache-ro", "Hi")
    assert result.returncode == 2
    assert "--prompt-cache-ro goes with --prompt-cache FILE" in error_line(result)
    result = llmctl("chat", "smollm2", "--no-cache", "--prompt-cache", "x.kv", input="Hi\n")
    assert result.returncode == 2 and "opposite" in error_line(result)


def test_a_cache_from_another_context_model_or_a_damaged_one_is_ignored_with_a_note(
        llmctl: Runner, tmp_path: Path, smollm2_gguf: Path) -> None:
    cache = tmp_path / "harbour.kv"
    question = "Which berth do grain ships use?"
    _, expected, _ = run(llmctl, question, "--prompt-cache", str(cache))
    saved = cache.read_bytes()

    other_ctx, text, stderr = run(llmctl, question, "--prompt-cache", str(cache),
                                  "--prompt-cache-ro", "--ctx", "2048")
    assert "not used: it was made by a context of 4096 tokens (this one is 2048)" in stderr
    assert other_ctx["cached_tokens"] == 0 and text == expected

    # A re-quantized SmolLM2 (Q8_0 from the Q4_1 file) is another model.
    requantized = tmp_path / "smollm2-q8_0.gguf"
    quantize(smollm2_gguf, requantized)
    result = llmctl("run", str(requantized), *GREEDY, "--max-tokens", "8", "--json",
                    "--prompt-cache", str(cache), "--prompt-cache-ro",
                    input=DOCUMENT + "\n\n" + question)
    assert result.returncode == 0, result.stderr
    assert "not used: it was made by another model" in result.stderr
    assert done_events(result.stdout)[0]["cached_tokens"] == 0

    # The MLX engine is not offered a llama.cpp state either (read before any load).
    identity = CacheIdentity("sha256:x", "mlx", 4096)
    with pytest.raises(CacheRefused, match="made by the llama engine|another model"):
        read(cache, identity, lambda *_: 0)

    for damaged in (saved[:len(saved) // 2], saved[:20], b"",
                    saved[:-1000] + bytes(1000)):
        cache.write_bytes(damaged)
        done, text, stderr = run(llmctl, question, "--prompt-cache", str(cache))
        assert "not used" in stderr and "Traceback" not in stderr
        assert done["cached_tokens"] == 0 and text == expected
        assert done["prompt_cache"]["saved"] is True  # replaced by a good one


def quantize(source: Path, target: Path) -> None:
    """llama.cpp's own quantizer, through llama-cpp-python's binding of it."""
    import llama_cpp.llama_cpp as lib

    params = lib.llama_model_quantize_default_params()
    params.ftype = lib.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = 2
    assert lib.llama_model_quantize(str(source).encode(), str(target).encode(),
                                    params) == 0


def test_kill_9_while_saving_leaves_no_cache_that_would_be_loaded(
        llmctl: Runner, tmp_path: Path) -> None:
    cache = tmp_path / "harbour.kv"
    partial = f".{cache.name}."
    process = subprocess.Popen(
        [llmctl_executable(), "run", "smollm2", *GREEDY, "--max-tokens", "1",
         "--prompt-cache", str(cache)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, text=True, env=os.environ)
    process.stdin.write(DOCUMENT * 2 + "\n\nWhich berth?")
    process.stdin.close()
    seen = False
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if any(p.name.startswith(partial) for p in tmp_path.iterdir()):
            process.send_signal(signal.SIGKILL)
            seen = True
            break
        time.sleep(0.001)
    process.wait()
    assert seen, "the run ended before it saved its cache"
    # Killed while writing: no file under the cache's name, or the whole one from a rename
    # that came first; never a part of one. The next run works either way.
    if cache.exists():
        assert read(cache, _identity_of(cache), lambda *_: len(_header(cache)["tokens"]))
    done, _, stderr = run(llmctl, "Which berth?", "--prompt-cache", str(cache))
    assert "Traceback" not in stderr and done["prompt_cache"]["saved"]


def _header(path: Path) -> dict:
    from llmctl.engines.prompt_cache import read_header

    return read_header(path)


def _identity_of(path: Path) -> CacheIdentity:
    header = _header(path)
    return CacheIdentity(header["model"], header["engine"], header["context"])


def test_system_clear_and_load_keep_only_the_unchanged_prefix(llama_engine, tmp_path) -> None:
    from llmctl.chat import ChatSession, Conversation, ConversationStore, run_command
    from llmctl.engines.text import Done

    options = GenerationOptions(temperature=0, max_tokens=30)
    store = ConversationStore(tmp_path)

    def ask(session: ChatSession, text: str) -> tuple[str, int]:
        events = list(session.ask(text))
        done = next(e for e in events if isinstance(e, Done))
        return "".join(e.text for e in events if hasattr(e, "text")), done.stats.cached_tokens

    def fresh(system: str, turns: list[tuple[str, str]], text: str) -> str:
        conversation = Conversation("smollm2:135m", system)
        for user, reply in turns:
            conversation.add_turn(user, reply)
        return ask(ChatSession(llama_engine, conversation, options, keep_cache=False), text)[0]

    session = ChatSession(llama_engine, Conversation("smollm2:135m", SYSTEM), options, store)
    ask(session, TURNS[0])
    ask(session, TURNS[1])
    held = llama_engine.cached_prefix()
    run_command(session, "/system You are a terse assistant who answers in one line.")
    text, cached = ask(session, TURNS[2])
    # The new system prompt changes the conversation from its first message on: only the
    # template's opening tokens are shared, and the reply is the uncached one.
    assert cached < 64 < len(held)
    assert text == fresh(session.conversation.system, session.conversation.turns[:2], TURNS[2])

    saved = session.conversation.id
    run_command(session, "/clear")
    text, _ = ask(session, TURNS[3])
    assert text == fresh(session.conversation.system, [], TURNS[3])
    run_command(session, f"/load {saved}")
    text, _ = ask(session, TURNS[4])
    loaded = session.conversation
    assert text == fresh(loaded.system, loaded.turns[:-1], TURNS[4])


# -- the header, unit by unit --------------------------------------------------------------


def test_the_header_names_what_made_the_cache_and_refuses_anything_else() -> None:
    identity = CacheIdentity("sha256:abc", "llama", 4096)
    header = identity.header([1, 2, 3])
    assert header["format"] == FORMAT_VERSION and header["token_count"] == 3
    assert identity.refusal(header) is None
    for change, reason in [({"model": "sha256:def"}, "another model"),
                           ({"engine": "mlx"}, "the mlx engine"),
                           ({"context": 2048}, "a context of 2048 tokens (this one is 4096)"),
                           ({"llmctl": "0.0.1"}, "llmctl version 0.0.1"),
                           ({"format": 99}, "format 99"),
                           ({"tokens": [1, 2]}, "its header is damaged"),
                           ({"tokens": "abc"}, "its header is damaged")]:
        assert reason in identity.refusal({**header, **change})


# -- the exactness rule: llama.cpp's numbers, bit for bit ---------------------------------


@pytest.fixture(scope="module")
def llama_engine(smollm2_gguf: Path):
    from llmctl.engines.llama import LlamaEngine

    engine = LlamaEngine(smollm2_gguf, LoadOptions(context_length=2048, threads=2))
    yield engine
    engine.close()


def _first_logits(engine, tokens: list[int], keep_cache: bool):
    import numpy as np

    options = GenerationOptions(temperature=0, max_tokens=1, seed=0)
    stats = list(engine.generate_from_tokens(tokens, options, keep_cache=keep_cache))[-1].stats
    size = engine.lib.llama_vocab_n_tokens(engine.vocab)
    # The stream ends after the first token without decoding it: these are the prompt's.
    logits = np.ctypeslib.as_array(engine.lib.llama_get_logits_ith(engine.ctx, -1),
                                   shape=(size,)).copy()
    return logits, stats


@pytest.mark.parametrize(("before", "total"), [
    (300, 420), (500, 560), (600, 1100), (1024, 1090), (530, 540)])
def test_a_kept_prefix_gives_the_logits_of_the_whole_prompt(llama_engine, before: int,
                                                             total: int) -> None:
    text = " ".join(f"Item {i}: the {['red', 'blue', 'green'][i % 3]} crate goes to "
                    f"shelf {i * 7 % 13}." for i in range(400))
    tokens = llama_engine.text_tokens(text)[:total]
    whole, _ = _first_logits(llama_engine, tokens, keep_cache=False)
    _first_logits(llama_engine, tokens[:before], keep_cache=False)  # the turn before
    kept, stats = _first_logits(llama_engine, tokens, keep_cache=True)
    assert (kept == whole).all(), f"kept {stats.cached_tokens}: logits differ"
    assert 0 < stats.cached_tokens <= before


def test_the_kept_prefix_never_leaves_a_short_batch() -> None:
    from llmctl.engines.llama import SAME_RESULT_BATCH, LlamaEngine

    engine = SimpleNamespace(n_ubatch=512)
    keep = LlamaEngine._exact_keep
    assert keep(engine, 300, 420) == 300  # 120 new tokens: one batch of the same kind
    assert keep(engine, 400, 420) == 420 - SAME_RESULT_BATCH
    assert keep(engine, 500, 530) == 448  # the whole prompt's last batch is [512, 530)
    assert keep(engine, 520, 530) == 512
    assert keep(engine, 480, 530) == 448  # [480, 512) would be short
    assert keep(engine, 512, 540) == 512  # the last batch exactly as the whole prompt's
    assert keep(engine, 480, 700) == 512 - SAME_RESULT_BATCH
    assert keep(engine, 30, 40) == 0  # a prompt shorter than one batch: all again


# -- MLX -----------------------------------------------------------------------------------


def test_mlx_chat_keeps_its_cache_between_turns_with_the_same_replies(
        llmctl: Runner, stored_mlx: str) -> None:
    args = ["chat", stored_mlx, *GREEDY, "--json", "--system", SYSTEM, "--max-tokens", "12"]
    turns = "\n".join(TURNS[:3]) + "\n"
    cached = done_events(llmctl(*args, input=turns).stdout)
    whole = done_events(llmctl(*args, "--no-cache", input=turns).stdout)
    assert len(cached) == len(whole) == 3
    assert [e["text"] for e in cached] == [e["text"] for e in whole]
    assert all(e["cached_tokens"] == 0 for e in whole)
    for before, turn in zip(cached, cached[1:], strict=False):
        # MLX keeps the whole prompt of the turn before (its results do not depend on
        # how the prompt is split); the reply before and the new message are processed.
        assert turn["cached_tokens"] == before["prompt_tokens"]


def test_mlx_run_prompt_cache_round_trip_and_a_llama_cache_is_refused(
        llmctl: Runner, stored_mlx: str, tmp_path: Path) -> None:
    cache = tmp_path / "mlx.kv"
    args = ["run", stored_mlx, *GREEDY, "--max-tokens", "8", "--json"]
    prompt = DOCUMENT[:500] + "\n\nWhich berth do grain ships use?"
    first = llmctl(*args, "--prompt-cache", str(cache), input=prompt)
    second = llmctl(*args, "--prompt-cache", str(cache), input=prompt)
    plain = llmctl(*args, input=prompt)
    assert first.returncode == second.returncode == plain.returncode == 0, second.stderr
    assert _text(second.stdout) == _text(plain.stdout) == _text(first.stdout)
    loaded = done_events(second.stdout)[0]
    assert loaded["prompt_cache"]["loaded_tokens"] == loaded["prompt_tokens"]
    assert loaded["cached_tokens"] == loaded["prompt_tokens"] - 1

    llama_cache = tmp_path / "llama.kv"
    assert llmctl("run", "smollm2", "--max-tokens", "1", "--prompt-cache", str(llama_cache),
                  "Hi").returncode == 0
    refused = llmctl(*args, "--prompt-cache", str(llama_cache), "--prompt-cache-ro",
                     input=prompt)
    assert refused.returncode == 0, refused.stderr
    assert "not used: it was made by" in refused.stderr
    assert _text(refused.stdout) == _text(plain.stdout)


def test_mlx_results_do_not_depend_on_how_the_prompt_is_split(converted) -> None:
    """Why MLX keeps the default `_exact_keep`: on the CPU, a prompt processed in parts,
    or a token at a time, gives the logits of the whole prompt bit for bit."""
    import numpy as np

    from llmctl.engines.mlx import load
    from llmctl.store.catalog import Catalog
    from llmctl.store.layout import StoreLayout
    from llmctl.store.resolve import runnable

    layout = StoreLayout(converted.home)
    model = runnable("smollm2:135m-mlx-q4", layout, Catalog.default(layout.root))
    engine = load(model.path, LoadOptions(context_length=1024))
    mx, make = engine.lib.mx, engine.lib.cache.make_prompt_cache
    tokens = engine.text_tokens(DOCUMENT)[:120]

    def logits(*parts: list[int]):
        cache = make(engine.model)
        for part in parts:
            out = engine.model(mx.array([part]), cache=cache)
        mx.eval(out)
        return np.array(out[0, -1])

    whole = logits(tokens)
    assert (logits(tokens[:70], tokens[70:]) == whole).all()
    assert (logits(tokens[:90], tokens[90:112], *([t] for t in tokens[112:])) == whole).all()
    engine.close()
