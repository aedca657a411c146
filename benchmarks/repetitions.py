"""What the benchmark scripts share: run every tool once per repetition in a shuffled
order, rows of best and median against a baseline tool, and llmctl's side of an engine
measured against its library (a prompt of a given length, pp and tg through the engine's
`generate_from_tokens`, timed by its Stats)."""

from __future__ import annotations

import random
import statistics
import sys
from collections.abc import Callable
from typing import TypeVar

KEYS = ("pp", "tg")
STORY = "Write a long story about a dragon who learns to paint."
FILLER = ("The quick brown fox jumps over the lazy dog while the farmer counts his sheep "
          "and the river runs past the old mill. ")
T = TypeVar("T")
Samples = dict[str, dict[str, list[float]]]


def shuffled(tools: dict[str, Callable[[], T]], reps: int) -> dict[str, list[T]]:
    """Each tool's results, one per repetition; a fixed-seed shuffle per repetition, so
    that no tool always runs first (or right after a given other one)."""
    results: dict[str, list[T]] = {t: [] for t in tools}
    order = list(tools)
    shuffle = random.Random(0).shuffle
    for rep in range(reps):
        shuffle(order)
        for name in order:
            results[name].append(tools[name]())
        print(f"repetition {rep + 1}/{reps} done", file=sys.stderr)
    return results


def run_shuffled(tools: dict[str, Callable[[], dict[str, float]]], reps: int) -> Samples:
    """tokens/s per tool and key (pp, tg), the tools run as `shuffled` runs them."""
    results = shuffled(tools, reps)
    return {t: {k: [r[k] for r in results[t]] for k in KEYS} for t in tools}


def ratio_rows(samples: Samples, baseline: str, digits: int) -> list[dict[str, object]]:
    """Best of the repetitions leads, as timeit advises: noise on a shared VM only ever
    slows a run down, so the fastest run is the best estimate of what the code costs.
    Medians are given too."""
    best = {k: max(samples[baseline][k]) for k in KEYS}
    middle = {k: statistics.median(samples[baseline][k]) for k in KEYS}
    rows = []
    for name, values in samples.items():
        row: dict[str, object] = {"tool": name}
        for key in KEYS:
            row[key] = round(max(values[key]), digits)
            row[f"{key}_ratio"] = round(max(values[key]) / best[key], 3)
            row[f"{key}_median"] = round(statistics.median(values[key]), digits)
            row[f"{key}_median_ratio"] = round(statistics.median(values[key]) / middle[key], 3)
        rows.append(row)
    return rows


def prompt_tokens(engine, target: int) -> list[int]:
    from llmctl.engines.text import Message

    words = FILLER * (target // 20 + 4)
    tokens = engine.prompt_tokens([Message("user", words)])
    while len(tokens) > target:
        words = words[:int(len(words) * target / len(tokens)) - 1]
        tokens = engine.prompt_tokens([Message("user", words)])
    return tokens


def llmctl_pp(engine, tokens: list[int]) -> float:
    from llmctl.engines.text import Done, GenerationOptions

    for event in engine.generate_from_tokens(tokens, GenerationOptions(temperature=0,
                                                                       max_tokens=1)):
        if isinstance(event, Done):
            return event.stats.prompt_tokens_per_second
    raise AssertionError("no Done event")


def llmctl_tg(engine, tokens: list[int], count: int) -> float:
    from llmctl.engines.text import Done, GenerationOptions

    options = GenerationOptions(temperature=0, max_tokens=count, ignore_eos=True)
    for event in engine.generate_from_tokens(tokens, options):
        if isinstance(event, Done):
            assert event.stats.generated_tokens == count
            return event.stats.generate_tokens_per_second
    raise AssertionError("no Done event")
