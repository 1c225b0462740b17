"""One run of tools.sweep: its rn50.train command (through torchrun for several processes), its stderr
relayed line by line (StderrRelay), SIGTERM/SIGUSR1 forwarded to it (Forwarder), and the line that says why
it failed."""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
from pathlib import Path

from tools.sweep_grid import GridPoint


def train_command(point: GridPoint, data: Path, run_dir: Path, nproc: int, extra: list[str],
                  resume: bool) -> list[str]:
    launcher = [sys.executable, "-m", "rn50.train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "rn50.train"]
    command = [*launcher, "--data", str(data), "--out", str(run_dir), "--base-lr", f"{point.base_lr!r}",
               "--batch-size", str(point.batch_size), *extra]
    return command + (["--resume", "auto"] if resume else [])


def error_line(lines, code: int) -> str:
    """The line that says why a run failed: its `error: ...` line when it printed one (torchrun ends with
    a banner of its own), else its `stopped by ...` line (torchrun, signalled, ends with a traceback), else
    the last line with words in it (a traceback's exception)."""
    reason = next((l for l in reversed(lines) if l.startswith("error: ")), None) \
        or next((l for l in reversed(lines) if l.startswith("stopped by ")), None) \
        or next((l for l in reversed(lines) if re.search(r"[A-Za-z0-9]", l)), None)
    exit_text = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return f"{exit_text}: {reason.strip()}" if reason else exit_text


# rn50.train's advice after a stop signal: true for a run of one's own, not for a run of the sweep, which
# refuses --resume after `--` and resumes its unfinished runs itself
STOP_HINT = re.compile(r"^stopped by (?P<signal>\S+):.*--resume auto")
TRACEBACK_START = "Traceback (most recent call last):"


class StderrRelay:
    """What the sweep echoes of a run's stderr, line by line (`feed` returns the lines to write):
    - rn50.train's last line, `stopped by SIGNAL: checkpoint saved to PATH; exit code 75. Run the same command
      with --resume auto to continue` (any `stopped by SIGNAL:` line that advises `--resume auto`), becomes
      `stopped by SIGNAL: the run saved a checkpoint; the sweep continues it when run again`;
    - torchrun's own traceback when it was signalled (it ends in `SignalException: ... got signal: N`) becomes
      one line saying so: it reports the signal, it is no crash.
    Every other line passes unchanged. A traceback is held until its exception line, then written whole
    (any other exception) or summarised (torchrun's SignalException)."""

    def __init__(self):
        self.held: list[str] = []

    def feed(self, line: str) -> list[str]:
        text = line.rstrip("\n")
        if self.held:
            self.held.append(line)
            if not text or text[0].isspace():  # a frame of the traceback
                return []
            held, self.held = self.held, []  # the exception line ends the traceback
            if "SignalException" in text:
                number = re.search(r"got signal: (\S+)", text)
                return [f"torchrun: stopped by signal {number.group(1) if number else '?'} (the traceback it prints "
                        "then is its report of the signal, not a crash; left out here)\n"]
            return held
        if text == TRACEBACK_START:
            self.held = [line]
            return []
        hint = STOP_HINT.match(text)
        if hint:
            return [f"stopped by {hint['signal']}: the run saved a checkpoint; the sweep continues it when run "
                    "again\n"]
        return [line]

    def close(self) -> list[str]:
        """What is still held at the end of the stream (a traceback cut short)."""
        held, self.held = self.held, []
        return held


class Forwarder:
    """Passes SIGTERM/SIGUSR1 (a scheduler's "stop soon") on to the running training process, which saves a
    checkpoint and exits 75; the sweep then stops too, and the same command continues it later."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.received: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        if self.proc is not None and self.proc.poll() is None:
            # always SIGTERM: torchrun forwards it to its workers, while SIGUSR1 would kill torchrun alone
            # and orphan them (docs/design.md#signals-under-torchrun); a single training process treats both alike
            self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run_one(command: list[str], forwarder: Forwarder) -> tuple[int, str | None]:
    """Run one training command to its end. Its stdout goes straight to ours; its stderr is echoed line by
    line through StderrRelay and the echoed tail kept, to name the cause if it fails. Returns (exit code,
    error line or None)."""
    tail: collections.deque[str] = collections.deque(maxlen=200)
    relay = StderrRelay()

    def echo(lines: list[str]) -> None:
        for text in lines:
            sys.stderr.write(text)
            tail.append(text.rstrip("\n"))
        sys.stderr.flush()

    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1) as proc:
        forwarder.proc = proc
        try:
            for line in proc.stderr:
                echo(relay.feed(line))
            echo(relay.close())
        except KeyboardInterrupt:
            echo(relay.close())
            proc.wait()  # Ctrl-C reached the run too: let it finish dying before we report
            raise
        finally:
            forwarder.proc = None
        code = proc.wait()
    return code, None if code == 0 else error_line(tail, code)
