"""A hang watchdog: a rank that stops making progress ends the job within a bounded time, naming who
stalled and what they were doing, instead of a silent hang until the collective's own timeout (NCCL 10 minutes, gloo 30 by default).

Every rank records its phase ("epoch 3 step 120: training step") at each step. A background thread
publishes it with a timestamp to the rendezvous store that torchrun already runs (so it works across
nodes without a shared file system) and watches its own rank: with no progress for `timeout_s`, it
prints the stalest rank and its last phase on the first line (`hang_report`: the rank that notices is
often only waiting for the stalled one in a collective), every rank's state below it, then exits with
EXIT_HUNG; torchrun then stops every other worker. A rank that dies outright is caught by torchrun itself (it
names the rank and its exit code); the survivors' collectives fail fast and `describe()` says what they
were doing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import threading
import time

import torch.distributed as dist

from rn50.reliability.exits import EXIT_HUNG

_KEY = "rn50/heartbeat/{}"
# The limit inside a `compiling()` section: torch.compile at a new shape can take many minutes under
# max-autotune (it benchmarks kernel choices), far past --hang-timeout's 600 s default, without being a hang.
# An hour still ends a compile that truly hangs.
COMPILE_TIMEOUT_S = 3600.0


_CHANGE_POLL_S = 0.1


def _kind(phase: str) -> str:
    """What a phase is about: a new step is no news, a new kind of work (validation, a save) is."""
    for kind in ("validation", "saving", "compiling"):
        if kind in phase:
            return kind
    return "training" if re.match(r"epoch \d+ (after )?step", phase) else re.sub(r"\d+", "#", phase)


def _store():
    from rn50.system.store import agent_store

    try:  # torchrun's agent store, which outlives a failed attempt (rn50.reliability.restart names the fault from it);
        # else the default process group's store (private API, hence the guard)
        store = agent_store()
        if store is not None:
            return store
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:
        return None


def stalest_rank(beats: dict[int, dict], world_size: int, now: float, frozen_after_s: float) -> int | None:
    """The rank to blame, from every rank's last heartbeat record (`beat`: wall time of the last heartbeat,
    `progress`: wall time of the last step, `phase`). A frozen process (stopped, stuck holding the GIL, a
    dead node) stops beating, while a process that waits in a collective beats on without progress: the
    rank whose heartbeat stopped longest ago comes first; then a rank that never sent one; then the rank
    whose progress is oldest. None: no heartbeats at all."""
    frozen = [r for r in beats if now - beats[r]["beat"] > frozen_after_s]
    if frozen:
        return min(frozen, key=lambda r: (beats[r]["beat"], beats[r]["progress"], r))
    missing = sorted(set(range(world_size)) - set(beats))
    if beats and missing:
        return missing[0]
    return min(beats, key=lambda r: (beats[r]["progress"], r)) if beats else None


def hang_report(beats: dict[int, dict], *, world_size: int, now: float, frozen_after_s: float, watcher: str,
                stalled_s: float, timeout_s: float, compiling: bool = False) -> list[str]:
    """The watchdog's message, a pure function of the heartbeats so that it is testable without processes.

    beats: rank -> {"beat", "progress" (wall times), "phase", "host", "pid"}, as published to the store;
    watcher: the rank that noticed, in words (`Watchdog.describe`); compiling: it was inside a compiling
    section, whose limit is the compile limit. The first line names the stalest rank and its last phase; the
    lines below say who noticed and every rank's state."""
    which = "while compiling (torch.compile)" if compiling else "--hang-timeout"
    limit = f"no progress for {stalled_s:.0f} s (limit {timeout_s:.0f} s, {which}) on {watcher}"
    stalest = stalest_rank(beats, world_size, now, frozen_after_s)
    missing = sorted(set(range(world_size)) - set(beats))
    if stalest is None:  # no store (one process) or it is gone: only this rank can be named
        lines = [f"watchdog: {limit}; ending the job"]
    elif stalest not in beats:
        lines = [f"watchdog: stalest rank {stalest}: no heartbeat ever (it never started its watchdog, or "
                 f"cannot reach the rendezvous store); last phase unknown",
                 f"  ending the job: {limit}"]
    else:
        beat = beats[stalest]
        since_beat, since_progress = now - beat["beat"], now - beat["progress"]
        state = (f"no heartbeat for {since_beat:.0f} s (frozen, stopped or unreachable)"
                 if since_beat > frozen_after_s else f"heartbeat {since_beat:.0f} s ago")
        lines = [f"watchdog: stalest rank {stalest} on {beat['host']} (pid {beat['pid']}): {state}, no progress "
                 f"for {since_progress:.0f} s; last phase: {beat['phase']}",
                 f"  ending the job: {limit}"]
    for rank, beat in sorted(beats.items()):
        mark = "  <- stalest" if rank == stalest else ""
        lines.append(f"  rank {rank} on {beat['host']} (pid {beat['pid']}): heartbeat "
                     f"{now - beat['beat']:.0f} s ago, progress {now - beat['progress']:.0f} s ago, "
                     f"while {beat['phase']}{mark}")
    if missing and beats:
        lines.append(f"  no heartbeat ever from ranks {missing}")
    return lines


class Watchdog:
    def __init__(self, rank: int, world_size: int, timeout_s: float, compile_timeout_s: float | None = None):
        """timeout_s: the limit without progress (0: no watchdog); compile_timeout_s: the limit inside a
        `compiling()` section (default: the larger of COMPILE_TIMEOUT_S and timeout_s)."""
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.compile_timeout_s = max(COMPILE_TIMEOUT_S, timeout_s) if compile_timeout_s is None \
            else compile_timeout_s
        self._compiling = False
        self.phase = "starting"
        self.last_progress, self.progress_time = time.monotonic(), time.time()
        self.interval = min(2.0, max(0.5, timeout_s / 5))  # heartbeat period
        self.store = _store()
        self.host = socket.gethostname()
        self._stop = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._watch, name="rn50-watchdog", daemon=True).start()

    def progress(self, phase: str) -> None:
        """Called at every step: cheap (three assignments)."""
        self.phase, self.last_progress, self.progress_time = phase, time.monotonic(), time.time()

    @contextlib.contextmanager
    def compiling(self, phase: str):
        """A section that may compile (the first step at a new shape under --compile): no progress is
        expected inside it for up to compile_timeout_s rather than timeout_s. Leaving it counts as progress,
        so the time spent compiling is not charged to what follows."""
        self.progress(f"{phase} (compiling)")
        self._compiling = True
        try:
            yield
        finally:  # progress first: the watching thread never sees the section closed with the old time
            self.progress(f"{phase}: compiled")
            self._compiling = False

    def describe(self) -> str:
        return f"rank {self.rank} on {self.host} (pid {os.getpid()}) while {self.phase}"

    def close(self) -> None:
        self._stop.set()

    def _publish(self) -> None:
        """The heartbeat says the process is alive (this thread runs even while the main thread waits
        in a collective); `progress` says when the training loop last moved."""
        if self.store is None:
            return
        beat = {"beat": time.time(), "progress": self.progress_time, "phase": self.phase, "host": self.host,
                "pid": os.getpid()}
        try:
            self.store.set(_KEY.format(self.rank), json.dumps(beat))
        except Exception:  # the store lives in rank 0's agent; it may be gone already
            pass

    def heartbeats(self) -> dict[int, dict]:
        beats = {}
        if self.store is None:
            return beats
        for rank in range(self.world_size):
            try:
                if self.store.check([_KEY.format(rank)]):
                    beats[rank] = json.loads(self.store.get(_KEY.format(rank)))
            except Exception:  # the store itself may be gone with a dead rank 0
                pass
        return beats

    def _watch(self) -> None:
        self._publish()
        published, kind = time.monotonic(), _kind(self.phase)
        while not self._stop.wait(min(_CHANGE_POLL_S, self.interval)):
            # at the heartbeat period, and at once when the kind of phase changes (training -> validation ->
            # saving), so that a restarted job's fault report knows what a rank that died was doing
            if time.monotonic() - published >= self.interval or _kind(self.phase) != kind:
                self._publish()
                published, kind = time.monotonic(), _kind(self.phase)
            compiling = self._compiling
            limit = self.compile_timeout_s if compiling else self.timeout_s
            stalled = time.monotonic() - self.last_progress
            if stalled > limit:
                self._give_up(stalled, limit, compiling)

    def _give_up(self, stalled: float, limit: float, compiling: bool) -> None:
        lines = hang_report(self.heartbeats(), world_size=self.world_size, now=time.time(),
                            frozen_after_s=3 * self.interval, watcher=self.describe(), stalled_s=stalled,
                            timeout_s=limit, compiling=compiling)
        print("\n".join(lines), file=sys.stderr, flush=True)
        from rn50.reliability.restart import record_exit

        record_exit(self.rank, EXIT_HUNG, lines[0], self.phase)  # for the restarted attempt's fault report
        os._exit(EXIT_HUNG)  # no cleanup: a collective in another thread would block it
