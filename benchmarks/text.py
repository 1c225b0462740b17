"""The harness's words for numbers, one home for every report and console line: a count with its noun, a
figure (or n/a where it was not measured), a fraction as a percentage.

No torch here: benchmarks/plan.py formats its flag errors with these before the harness imports torch."""

from __future__ import annotations

import math

NA = "n/a"  # not measured, or not known here: never zero


def count(n: int, noun: str, plural: str | None = None) -> str:
    """"1 step", "3 steps": console and report lines."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def num(value, fmt: str = "{:,.1f}") -> str:
    """`value` through `fmt` (a str.format template, "{:,.1f}" by default), or n/a when it is None or NaN."""
    return NA if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def pct(value) -> str:
    """A 0-1 fraction as a percentage with one decimal, or n/a."""
    return num(None if value is None else 100 * value, "{:.1f}%")
