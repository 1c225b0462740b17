"""A hang watchdog: a rank that stops making progress ends the job within a bounded time, naming who
stalled and what they were doing, instead of a silent hang until the collective's own timeout (NCCL 10 minutes, gloo 30 by default).

Every rank records its phase ("epoch 3 step 120: training step") at each step. A background thread
publishes it with a timestamp to the rendezvous store that torchrun already runs (so it works across
nodes without a shared file system) and watches its own rank: with no progress for `timeout_s`, it
prints which rank has the oldest heartbeat and what that rank was doing, then exits with EXIT_HUNG;
torchrun then stops every other worker. A rank that dies outright is caught by torchrun itself (it
names the rank and its exit code); the survivors' collectives fail fast and `describe()` says what they
were doing.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import torch.distributed as dist

EXIT_HUNG = 4
_KEY = "rn50/heartbeat/{}"


def _store():
    try:  # the default process group's store: torchrun's rendezvous (private API, hence the guard)
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:
        return None


class Watchdog:
    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
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
        while not self._stop.wait(self.interval):
            self._publish()
            stalled = time.monotonic() - self.last_progress
            if stalled > self.timeout_s:
                self._give_up(stalled)

    def _give_up(self, stalled: float) -> None:
        lines = [f"watchdog: no progress for {stalled:.0f} s (limit {self.timeout_s:.0f} s, --hang-timeout) on "
                 f"{self.describe()}; ending the job"]
        beats = self.heartbeats()
        if beats:
            now = time.time()
            # A frozen process (stopped, stuck holding the GIL, a dead node) stops beating; a process
            # that waits in a collective beats on but makes no progress. Blame the first kind first.
            frozen = [r for r in beats if now - beats[r]["beat"] > 3 * self.interval]
            stalest = min(frozen or beats, key=lambda r: (beats[r]["beat"], beats[r]["progress"]) if frozen
                          else beats[r]["progress"])
            for rank, beat in sorted(beats.items()):
                mark = "  <- stalest" if rank == stalest else ""
                lines.append(f"  rank {rank} on {beat['host']} (pid {beat['pid']}): heartbeat "
                             f"{now - beat['beat']:.0f} s ago, progress {now - beat['progress']:.0f} s ago, "
                             f"while {beat['phase']}{mark}")
            missing = sorted(set(range(self.world_size)) - set(beats))
            if missing:
                lines.append(f"  no heartbeat ever from ranks {missing}")
        print("\n".join(lines), file=sys.stderr, flush=True)
        os._exit(EXIT_HUNG)  # no cleanup: a collective in another thread would block it
