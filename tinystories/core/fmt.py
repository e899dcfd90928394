"""How numbers and durations read in the toolkit's output: one home for each style."""

from __future__ import annotations


def fmt_count(n: float) -> str:
    """A count with a unit: 3.93M, 12.50k, 7."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_clock(s: float) -> str:
    """A duration as a clock reads it, for progress lines and ETAs: 0m46s, 10m08s, 1h05m."""
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_approx(s: float) -> str:
    """A rough duration, for plans and summaries: 45s, 1.5 min."""
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.1f} min"
