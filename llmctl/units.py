"""Sizes, counts and durations, as llmctl prints and reads them. The ground floor: no
imports from llmctl, so every layer (store, engines, convert, cli) can use it."""

from __future__ import annotations

import time


def format_bytes(size: float) -> str:
    """Decimal units, as Ollama and the Hub show sizes: 98 MB, 4.7 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(size)} B"
            return f"{size:.0f} {unit}" if abs(size) >= 100 else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def format_count(count: float) -> str:
    """Parameter counts: 134.5M, 1.2B."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(int(count))


def format_age(timestamp: float, now: float | None = None) -> str:
    seconds = max(0, int((now or time.time()) - timestamp))
    for unit, span in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400),
                       ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= span:
            n = seconds // span
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def format_seconds(seconds: float) -> str:
    """2.4s, 1m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


_SCALE = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "8G", "512MB", "1.5GiB". K, M, G, T are powers of 1000, as
    llmctl prints sizes (and as the Hub and Ollama do); Ki, Mi, Gi, Ti are powers of 1024.
    ValueError when unreadable."""
    import re

    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?)b?|b)?\s*", text.lower())
    if not found:
        raise ValueError(f"'{text}' is not a size")
    base = 1024 if found[3] else 1000
    return round(float(found[1]) * base ** _SCALE[found[2] or ""])
