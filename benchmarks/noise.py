"""The one noise rule every decision in the report follows: a difference between two measurements counts only
beyond their measured spread; otherwise it is "within noise".

Every decision goes through `compare`: the verdicts' ratio to the ceiling and the loader's headroom, which loader
is fastest and which tie with it, the ratios to DALI, --autotune's best setting, --levers' gains. The same three
words mean the same thing everywhere: "faster", "slower", "within noise".

Two kinds of pairs:
- **Measured in the same rounds** (the main table: every round measures the ceiling and every loader once,
  benchmarks/measure.py's measure_rounds): the ratio of each round's pair, so a drift of the machine during the
  run (a neighbour's job, clocks, heat) cancels in each ratio; the noise is those ratios' spread.
- **Measured apart** (levers, autotune's settings): the two measurements' own spreads added.

A row measured while other work ran on the machine (rn50.system.load judged one of its windows busy) keeps its
figures, but every decision it takes part in is of low confidence, and says so (`busy`).

A spread is (max - min) / mean of the windows' img/s. It comes from a few windows, and two windows can agree by
luck: NOISE_FLOOR is the least noise assumed whatever the windows say. With one window per measurement the
spread is unknown, and no difference counts.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

# Two or three windows can fall close together by luck, and then understate the noise: however close they fell,
# no pair is called apart below 3%, a difference too small to choose a loader or a setting by anyway.
NOISE_FLOOR = 0.03
FASTER, SLOWER, WITHIN = "faster", "slower", "within noise"


def round_order(jobs: Sequence, number: int) -> list:
    """The order of round `number` (0-based): forward in even rounds, backward in odd ones, so a steady drift of
    the machine (a neighbour's job, clocks, heat) reaches every job alike over each pair of rounds, and no job is
    always first (benchmarks.measure.measure_rounds, benchmarks.shootout)."""
    return list(jobs) if number % 2 == 0 else list(jobs)[::-1]


def spread(values: Sequence[float]) -> float | None:
    """(max - min) / mean; None with fewer than two values (the spread is unknown)."""
    return (max(values) - min(values)) / statistics.fmean(values) if len(values) > 1 else None


def compare(mine: Sequence[float], theirs: Sequence[float], paired: bool = True) -> dict:
    """`mine` against `theirs`, each a measurement's windows' img/s. `paired`: window i of each was measured
    in the same round, so the noise is the spread of the rounds' ratios; else the two spreads added.

    Returns the ratio (mean over mean), the noise (None: unknown, one window), whether the difference counts
    and its word: FASTER or SLOWER beyond the noise, WITHIN otherwise (and always when the noise is unknown)."""
    ratio = statistics.fmean(mine) / statistics.fmean(theirs)
    if paired and len(mine) == len(theirs):
        measured = spread([a / b for a, b in zip(mine, theirs)])
    else:
        own, other = spread(mine), spread(theirs)
        measured = None if own is None or other is None else own + other
    noise = None if measured is None else max(NOISE_FLOOR, measured)
    counts = noise is not None and abs(ratio - 1) > noise
    word = WITHIN if not counts else FASTER if ratio > 1 else SLOWER
    return {"ratio": ratio, "noise": noise, "counts": counts, "word": word}


def windows(row: dict | None) -> list[float] | None:
    """A result row's windows' img/s (all ranks together), one per round in the main table; None when not
    measured."""
    return None if not row else row.get("img_per_s_windows") or [row["img_per_s"]]


def busy(row: dict | None) -> bool:
    """Whether other work ran during any of the row's windows (rn50.system.load: judged per window)."""
    return bool(row and (row.get("load") or {}).get("busy"))
