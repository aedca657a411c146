"""Sampling a token from a row of logits with numpy, for the engines whose runtimes give
logits and leave the choice to the caller (ExecuTorch, Core ML): top-k, top-p, min-p,
then temperature, llama.cpp's order, so a setting means the same on every engine; greedy
at temperature 0. Seeded per reply: the same seed gives the same reply."""

from __future__ import annotations

from typing import Any

import numpy as np

from llmctl.engines.text import GenerationOptions


class Sampler:
    def __init__(self, options: GenerationOptions):
        self.options = options
        self.greedy = options.temperature <= 0
        self.random = np.random.default_rng(options.seed)

    def __call__(self, logits: Any) -> int:
        """A token id from one row of logits (masked ones are -inf)."""
        row = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.greedy:
            return int(np.argmax(row))
        ids, probs = candidates(row, self.options)
        return int(self.random.choice(ids, p=probs))


def candidates(row: np.ndarray, options: GenerationOptions) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, their probabilities) that sampling chooses among."""
    k = options.top_k if 0 < options.top_k < row.size else row.size
    ids = np.argpartition(-row, k - 1)[:k] if k < row.size else np.arange(row.size)
    ids = ids[np.argsort(-row[ids], kind="stable")]
    ids = ids[np.isfinite(row[ids])] if np.isfinite(row[ids[0]]) else ids[:1]
    kept = row[ids]
    probs = _softmax(kept)
    if options.top_p < 1.0:
        # The smallest head whose probability reaches top_p (always the first token).
        reach = int(np.searchsorted(np.cumsum(probs), options.top_p)) + 1
        ids, kept, probs = ids[:reach], kept[:reach], probs[:reach]
    if options.min_p > 0.0:
        keep = probs >= options.min_p * probs[0]
        ids, kept = ids[keep], kept[keep]
    return ids, _softmax(kept / options.temperature)


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()
