"""CPU time of a process tree: this process (all its threads: DALI's are in-process) and every descendant
(DataLoader workers, decoding processes), from /proc (Linux), with no dependency beyond the standard library.

Why CPU time: on a shared machine a loader's img/s swings with what its neighbours run, while the CPU seconds
it spends per image hold (benchmarks/shootout.py). Each live process counts its own user and system time
(utime + stime: all its threads) and what its reaped children spent (cutime + cstime), so a worker that exits
between two readings still counts once, through the parent that reaped it. This process reads its own from
getrusage (microseconds, not clock ticks).

`settle(tree)` waits until the tree spends no more CPU: every loader fills a bounded queue ahead of its consumer
(DataLoader's prefetch_factor, DALI's prefetch queue) and then waits, so two readings at two settled moments
bracket exactly the work of the batches consumed between them, whatever the queue's depth.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from rn50.config.errors import UserError

PROC = Path("/proc")
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
POLL_S = 0.02  # settle's poll interval: the error of the moment it finds, against a pass of seconds
QUIET_S = 0.3  # no CPU spent for this long: the tree waits on its consumer (DataLoader workers poll every 5 s)


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and its reaped children) from /proc/<pid>/stat; None: gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": the name may hold spaces and brackets
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return int(fields[1]), (utime + stime + cutime + cstime) * TICK_S


def descendants(root: int) -> list[int]:
    """Every live descendant of `root` (children, their children, ...), from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def own_cpu_s() -> float:
    """This process's CPU seconds (every thread) and its reaped children's."""
    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime


@dataclass
class Tree:
    """This process and its descendants. `read()` is their CPU seconds now; the descendants are looked up
    afresh at each `refresh()` (a pass's start and end), not at each read, so settle's polls stay cheap."""

    pids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not (PROC / "self" / "stat").exists():
            raise UserError("the CPU time of a loader's worker processes is read from /proc, which this system "
                            "lacks; run the shootout on Linux")
        self.refresh()

    def refresh(self) -> "Tree":
        self.pids = descendants(os.getpid())
        return self

    def read(self) -> float:
        total = own_cpu_s()
        for pid in self.pids:
            stat = _stat(pid)
            total += stat[1] if stat is not None else 0.0  # exited: counted once reaped, in its parent's
        return total


def settle(tree: Tree, limit_s: float = 20.0) -> tuple[float, bool]:
    """Wait until the tree spends no CPU for QUIET_S (this thread's polling aside). Returns (the moment, on
    time.perf_counter's clock, of the last poll that still saw CPU spent: when its work ended; whether it
    settled within `limit_s`)."""
    start = last_busy = time.perf_counter()
    own = time.thread_time()
    before = tree.read() - own
    while True:
        time.sleep(POLL_S)
        now, own = time.perf_counter(), time.thread_time()
        cpu = tree.read() - own  # the polls' own CPU is this thread's: not the loader's
        if cpu - before > 0.5 * TICK_S:
            last_busy, before = now, cpu
        elif now - last_busy >= QUIET_S:
            return last_busy, True
        if now - start > limit_s:
            return now, False
