"""Step timing and input stall.

On a GPU the host runs ahead of the device, so the time the host spends waiting in `next()` says little
(39% host wait in a run at 93% of the GPU ceiling: docs/design.md#throughput-on-one-h100). What matters is
whether the GPU sits idle waiting for input. Two CUDA events per step answer it on the GPU's own timeline:

    start_i  recorded just before step i's work is enqueued
    end_i    recorded just after it

If the GPU is still busy when the host enqueues step i, start_i fires the moment end_{i-1} does: no gap.
If the GPU ran dry while the host waited for a batch, start_i fires only when the host records it, and
start_i - end_{i-1} is GPU idle time. Stall = sum of gaps / the window's span. The host synchronises only
at the window's edges.

On CPU there is no asynchronous device: host time spent in `next()` is the stall, labelled host-side.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Window:
    """One timed window of `steps` steps of `batch` images each (on one rank)."""

    steps: int
    batch: int
    seconds: float
    step_s: list[float]  # per-step times
    wait_s: list[float]  # per-step input wait (GPU idle gap, or host time in next())
    stall_basis: str  # "gpu_timeline" or "host_side"

    @property
    def stall_s(self) -> float:
        return sum(self.wait_s)

    @property
    def img_per_s(self) -> float:
        return self.steps * self.batch / self.seconds

    @property
    def stall_fraction(self) -> float:
        return self.stall_s / self.seconds

    def step_stats(self) -> dict:
        ordered = sorted(self.step_s)
        return {
            "mean_s": statistics.fmean(ordered),
            "p50_s": percentile(ordered, 50),
            "p95_s": percentile(ordered, 95),
        }


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on a sorted list."""
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class StepTimer:
    """Marks around each step; `window()` turns the marks of the timed steps into a Window."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host_before: list[float] = []
        self.host_after: list[float] = []
        self.events: list[tuple] = []

    def before(self) -> None:
        self.host_before.append(time.perf_counter())
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.events.append((start, None))

    def after(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events[-1] = (self.events[-1][0], end)
        self.host_after.append(time.perf_counter())

    def window(self, first: int, batch: int) -> Window:
        """The window from step `first` (the first timed step) to the last step marked.

        It begins where step first-1 ended, so the wait for step `first`'s batch is inside it."""
        if first < 1:
            raise ValueError("a window needs at least one warm-up step before it (its start mark)")
        steps = len(self.host_after) - first
        if steps < 2:
            raise ValueError(f"a timed window needs at least 2 steps, got {steps}")
        if self.cuda:
            torch.cuda.synchronize()
            ends = [end for _, end in self.events]
            starts = [start for start, _ in self.events]
            step_s = [ends[i - 1].elapsed_time(ends[i]) / 1e3 for i in range(first, len(ends))]
            gaps = [max(0.0, ends[i - 1].elapsed_time(starts[i]) / 1e3) for i in range(first, len(ends))]
            return Window(steps, batch, sum(step_s), step_s, gaps, "gpu_timeline")
        after, before = self.host_after, self.host_before
        step_s = [after[i] - after[i - 1] for i in range(first, len(after))]
        waits = [before[i] - after[i - 1] for i in range(first, len(after))]
        return Window(steps, batch, after[-1] - after[first - 1], step_s, waits, "host_side")
