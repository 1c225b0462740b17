"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before it kills a job) asks the run to stop, and so does
SIGINT (Ctrl-C); and the other ways a run stops before its last epoch with an exit code of its own (lost
data, divergence).

The handler only sets a flag; the training loop saves a checkpoint at the next step boundary where every
rank agrees to stop, then exits with EXIT_PREEMPTED (EXIT_INTERRUPTED after Ctrl-C). torchrun forwards
SIGTERM (and the SIGINT it gets) to its workers and kills them 30 s later, so the check runs often enough to
save well inside that time. A second SIGINT ends the process at once, the default way: the user asked twice.
"""

from __future__ import annotations

import os
import signal

from rn50.reliability.exits import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_PREEMPTED
from rn50.system.dist import any_rank

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self, check_every: int, announce: bool = True):
        self.check_every = check_every  # steps between checks (a tiny collective when distributed)
        self.signal_name: str | None = None
        self._pid = os.getpid()  # a forked loader worker inherits the handler: ignored there
        # what rank 0 says at once on SIGINT; under torchrun the SIGINT is torchrun's, passed on once (the terminal's
        # second Ctrl-C reaches torchrun alone)
        self._announce = b""
        if announce and "TORCHELASTIC_RUN_ID" in os.environ:
            self._announce = b"SIGINT from torchrun: saving a checkpoint, then stopping\n"
        elif announce:
            self._announce = b"Ctrl-C: saving a checkpoint, then stopping (a second Ctrl-C stops at once, without it)\n"
        self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}

    def close(self) -> None:
        """Give the signals back (a run inside a longer-lived process, such as a test, ends cleanly)."""
        for signum, handler in self._previous.items():
            if signum != signal.SIGINT or signal.getsignal(signum) == self._handle:  # after Ctrl-C: a second ends it
                signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a torchvision DataLoader worker: the run stops it
        self.signal_name = self.signal_name or signal.Signals(signum).name  # the first one names the stop
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
            if self._announce:  # os.write: print() is not safe inside a signal handler
                os.write(2, self._announce)

    def agreed(self, step: int, force: bool = False) -> bool:
        """True on every rank at the same step once any rank has received a stop signal. Every rank
        calls it at the same steps; `force` checks now, whatever the step."""
        if not force and (step + 1) % self.check_every:
            return False
        return any_rank(self.signal_name is not None)


class Preempted(Exception):
    """A stop signal, after the checkpoint it asked for (`saved`: its path on rank 0; None elsewhere, or
    where the weights held NaN and no checkpoint could be written)."""

    def __init__(self, signal_name: str, saved: Path | None):
        super().__init__(signal_name)
        self.signal_name, self.saved = signal_name, saved

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signal_name == "SIGINT" else EXIT_PREEMPTED

    def report(self) -> str:
        """The run's last line: under torchrun, the agent's own SignalException report follows it."""
        saved = f"checkpoint saved to {self.saved}" if self.saved else "no new checkpoint (the weights held NaN or inf)"
        return (f"stopped by {self.signal_name}: {saved}; exit code {self.exit_code}. Run the same command with "
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
    """The loss stayed NaN or inf: the run stops without saving."""

    exit_code = EXIT_DIVERGED
