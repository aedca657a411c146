"""What the benchmark scripts share: run every tool once per repetition in a shuffled
order, and rows of best and median against a baseline tool."""

from __future__ import annotations

import random
import statistics
import sys
from collections.abc import Callable
from typing import TypeVar

KEYS = ("pp", "tg")
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
