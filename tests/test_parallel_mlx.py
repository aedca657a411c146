"""Parallel sequences on the MLX engine (`MlxSlots`, mlx-lm's batch KV cache), on the real
SmolLM2 converted to MLX 4-bit (tests/conftest.py's session conversion), Linux mlx[cpu].

At temperature 0 every reply must be what one lone sequence gives for its prompt (the loop
`llmctl run` runs), token for token, whatever else shares the batch. Replies stay short:
MLX on a CPU makes a few tokens a second.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MLX_Q4, PARIS, Converted

from llmctl.engines.parallel import Failed, Request, generate_many
from llmctl.engines.text import Done, GenerationOptions, LoadOptions, Message, Token
from llmctl.errors import UsageError
from llmctl.store import manifest as manifests
from llmctl.store.layout import StoreLayout
from llmctl.store.model_files import model_folder

# Questions of varied lengths, some answered in a few tokens and some running to the
# budget, so that sequences end at different steps and freed slots take the next prompt
# while the others are mid-reply.
QUESTIONS = [
    PARIS,
    "Who wrote Romeo and Juliet?",
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "Explain to a child, in a few friendly words, why the sky looks blue during the day.",
    "Name a colour.",
    "Give me a name for a pet turtle.",
    "What should I cook tonight? Something quick with rice, vegetables and eggs, please.",
]
GREEDY = GenerationOptions(temperature=0, max_tokens=20)
SYSTEM = Message("system", "You are a helpful assistant.")  # shorter than SmolLM2's own
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def _folder(converted: Converted) -> Path:
    layout = StoreLayout(converted.home)
    name, tag = MLX_Q4.split(":")
    found = manifests.load(layout, name, tag)
    assert found is not None
    return model_folder(layout, found)


@pytest.fixture(scope="module")
def engine(converted: Converted) -> Iterator:
    from llmctl.engines.mlx import load

    llm = load(_folder(converted), LoadOptions(sequences=3))
    yield llm
    llm.close()


def _tokens(engine, question: str) -> list[int]:
    return engine.prompt_tokens([SYSTEM, Message("user", question)])


def _lone(engine, tokens: list[int], options: GenerationOptions) -> tuple[str, object]:
    """The reply of one sequence alone: the loop `run` runs."""
    events = list(engine.generate_from_tokens(tokens, options))
    assert isinstance(events[-1], Done)
    return "".join(e.text for e in events[:-1]), events[-1].stats


def _batched(engine, requests: list[Request], parallel: int
             ) -> tuple[dict, dict, list[tuple[object, object]]]:
    """Texts and final events by key, and the event stream as it came."""
    texts: dict = {}
    ends: dict = {}
    stream = []
    for key, event in generate_many(engine, requests, parallel):
        stream.append((key, event))
        if isinstance(event, Token):
            texts.setdefault(key, []).append(event.text)
        else:
            assert key not in ends, f"{key} ended twice"
            ends[key] = event
    return {key: "".join(parts) for key, parts in texts.items()}, ends, stream


def test_parallel_replies_equal_lone_replies_token_for_token(engine) -> None:
    requests = [Request(i, _tokens(engine, q), GREEDY) for i, q in enumerate(QUESTIONS)]
    lone = {r.key: _lone(engine, r.tokens, r.options) for r in requests}
    texts, ends, stream = _batched(engine, requests, 3)

    assert set(ends) == set(lone)
    for key, (text, stats) in lone.items():
        done = ends[key]
        assert isinstance(done, Done), done
        assert texts.get(key, "") == text, QUESTIONS[key]
        assert (done.stats.generated_tokens, done.stats.stop_reason, done.stats.prompt_tokens
                ) == (stats.generated_tokens, stats.stop_reason, stats.prompt_tokens)
    assert "Paris" in texts[0]
    # Continuous batching: never more than 3 replies in flight, 3 at once at some point,
    # and a reply started in a freed slot while others were mid-reply.
    started: set = set()
    finished: set = set()
    most, joined_mid_reply = 0, False
    for key, event in stream:
        if key not in started:
            joined_mid_reply |= bool(finished) and bool(started - finished)
            started.add(key)
        if isinstance(event, Done):
            finished.add(key)
        most = max(most, len(started - finished))
    assert most == 3 and joined_mid_reply
    lengths = {stats.generated_tokens for _, stats in lone.values()}
    assert len(lengths) > 1  # the replies did end at different steps


def test_slots_keep_each_sequence_apart_as_rows_come_and_go(engine) -> None:
    """The Slots contract itself: a slot released mid-batch and started again with another
    prompt (its row now last) while the other two go on; every sequence's tokens are
    those its prompt gives alone."""
    prompts = [_tokens(engine, q) for q in QUESTIONS[:4]]
    steps = 6
    options = GenerationOptions(temperature=0, seed=0)

    def alone(tokens: list[int]) -> list[int]:
        engine._trim_cache(0)  # a fresh cache, as generate_from_tokens starts a reply with
        stream = engine._steps(tokens, options, steps)
        try:
            return [next(stream) for _ in range(steps)]
        finally:
            stream.close()

    expected = [alone(p) for p in prompts]
    slots = engine.open_slots(3)
    assert slots is not None and slots.count == 3
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    try:
        for slot in range(3):
            got[slot].append(slots.start(slot, prompts[slot], options, None))
        for _ in range(2):
            for slot, token in slots.advance({s: t[-1] for s, t in got.items()}).items():
                got[slot].append(token)
        assert got[1] == expected[1][:3]
        slots.release(1)
        got[1] = [slots.start(1, prompts[3], options, None)]
        running = {0, 1, 2}
        while running:
            following = slots.advance({s: got[s][-1] for s in running})
            for slot, token in following.items():
                got[slot].append(token)
                if len(got[slot]) == steps:  # as the loop does when a reply has ended
                    slots.release(slot)
                    running.remove(slot)
    finally:
        slots.close()
    assert [got[0], got[2], got[1]] == [expected[0], expected[2], expected[3]]


def test_a_json_schema_reply_in_a_batch_is_valid_and_what_it_is_alone(engine) -> None:
    from jsonschema import validate

    from llmctl.engines.constraint import OutputFormat

    schema = GenerationOptions(temperature=0, max_tokens=48,
                               output=OutputFormat(PERSON).check())
    requests = [Request("plain", _tokens(engine, PARIS), GREEDY),
                Request("person", _tokens(engine, "Invent a person."), schema),
                Request("other", _tokens(engine, QUESTIONS[2]), GREEDY)]
    texts, ends, _ = _batched(engine, requests, 3)
    assert all(isinstance(ends[key], Done) for key in ("plain", "person", "other")), ends
    person = json.loads(texts["person"])
    validate(person, PERSON)
    assert texts["person"] == _lone(engine, requests[1].tokens, schema)[0]
    assert "Paris" in texts["plain"] and "{" not in texts["plain"]


def test_seeded_replies_at_a_temperature_are_their_own(engine) -> None:
    """Each sequence draws with its own key: a seed gives the same reply in any slot,
    beside any neighbours, and the one `run` gives with that seed."""
    hot = {"temperature": 1.2, "max_tokens": 8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
    story = _tokens(engine, "Tell me a very short story.")
    requests = [Request("a", story, GenerationOptions(seed=42, **hot)),
                Request("greedy", _tokens(engine, QUESTIONS[1]), GREEDY),
                Request("b", story, GenerationOptions(seed=42, **hot)),
                Request("c", story, GenerationOptions(seed=7, **hot))]
    texts, ends, _ = _batched(engine, requests, 3)
    assert all(isinstance(ends[r.key], Done) for r in requests), ends
    assert texts["a"] == texts["b"] == _lone(engine, story, requests[0].options)[0]
    assert texts["c"] == _lone(engine, story, requests[3].options)[0]
    assert texts["a"] != texts["c"]


def test_a_prompt_too_long_for_the_context_fails_alone(converted: Converted) -> None:
    from llmctl.engines.mlx import load

    small = load(_folder(converted), LoadOptions(context_length=64, sequences=2))
    try:
        long = _tokens(small, " ".join([PARIS] * 6))
        assert len(long) > 64
        requests = [Request("first", _tokens(small, QUESTIONS[1]), GREEDY),
                    Request("long", long, GREEDY),
                    Request("last", _tokens(small, PARIS), GREEDY)]
        texts, ends, stream = _batched(small, requests, 2)
    finally:
        small.close()
    failed = ends["long"]
    assert isinstance(failed, Failed) and isinstance(failed.error, UsageError)
    assert f"the prompt is {len(long)} tokens but the context holds 64" in str(failed.error)
    assert [event for key, event in stream if key == "long"] == [failed]
    assert isinstance(ends["first"], Done) and ends["first"].stats.generated_tokens > 0
    assert isinstance(ends["last"], Done) and "Paris" in texts["last"]
