"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before it kills a job) asks the run to stop.

The handler only sets a flag; the training loop saves a checkpoint at the next step boundary where every
rank agrees to stop, then exits with EXIT_PREEMPTED. torchrun forwards SIGTERM to its workers and
kills them 30 s later, so the check runs often enough to save well inside that time.
"""

from __future__ import annotations

import signal

from rn50.system.dist import any_rank

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: a temporary failure, run the same command again
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, check_every: int):
        self.check_every = check_every  # steps between checks (a tiny collective when distributed)
        self.signal_name: str | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}

    def close(self) -> None:
        """Give the signals back (a run inside a longer-lived process, such as a test, ends cleanly)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, step: int, force: bool = False) -> bool:
        """True on every rank at the same step once any rank has received a stop signal. Every rank
        calls it at the same steps; `force` checks now, whatever the step."""
        if not force and (step + 1) % self.check_every:
            return False
        return any_rank(self.signal_name is not None)
