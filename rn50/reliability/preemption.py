"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before it kills a job) asks the run to stop; and the
other ways a run stops before its last epoch with an exit code of its own (lost data, divergence).

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


EXIT_DIVERGED = 3  # the loss stayed NaN or inf (Diverged)


class Preempted(Exception):
    """A stop signal, after the checkpoint it asked for (`saved`: its path on rank 0; None elsewhere, or
    where the weights held NaN and no checkpoint could be written)."""

    def __init__(self, signal_name: str, saved: Path | None):
        super().__init__(signal_name)
        self.signal_name, self.saved = signal_name, saved

    def report(self) -> str:
        """The run's last line: under torchrun, the agent's own SignalException report follows it."""
        saved = f"checkpoint saved to {self.saved}" if self.saved else "no new checkpoint (the weights held NaN or inf)"
        return (f"stopped by {self.signal_name}: {saved}; exit code {EXIT_PREEMPTED}. Run the same command with "
                "--resume auto to continue")


class DataLost(Preempted):
    """The data source failed mid-epoch after every retry (pipelines.storage.StorageLost). One process saves a
    checkpoint at the last step trained; with several, the ranks that still read are inside the step's
    all-reduce, so the last periodic checkpoint is where a resume starts (--checkpoint-every)."""

    def report(self) -> str:
        saved = f"checkpoint saved to {self.saved}" if self.saved else \
            "the last checkpoint (--checkpoint-every) is where a resume starts"
        return (f"stopped: {self.signal_name}; {saved}; exit code {EXIT_PREEMPTED}. When the storage answers "
                "again, run the same command with --resume auto")


class Diverged(Exception):
    pass
