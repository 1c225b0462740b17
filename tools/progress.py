"""The dataset tools' one progress bar: tqdm with rate and ETA, on stderr.

On a terminal it is tqdm's bar, redrawn in place. Anywhere else (CI logs, SLURM output files, a pipe) a
carriage return does not rewind, so it prints one whole plain line every `log_every` seconds (30 by default)
and a last one when it closes:

    scan: 1200/5000 files (24%) in 00:31, ETA 01:38, 38.71 files/s, 2 bad
"""

from __future__ import annotations

import sys
from typing import IO

from tqdm import tqdm

LOG_EVERY = 30.0  # seconds between lines when the output is not a terminal
TTY_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt}{unit} ({percentage:.0f}%) in {elapsed}, ETA {remaining}, {rate_fmt}{postfix}"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt}{unit} in {elapsed}, {rate_fmt}{postfix}"


class _Lines:
    """A stream for tqdm that makes each refresh one whole line: tqdm writes '\\r' + text + padding to redraw,
    and a lone '\\n' (or '\\r' + spaces) on closing, which here become nothing."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def bar(total: int | None, desc: str, unit: str = "files", file: IO[str] | None = None, enabled: bool = True,
        log_every: float = LOG_EVERY) -> tqdm:
    """A tqdm progress bar for `total` items (None: unknown), configured for a terminal or for a log.
    `enabled=False` gives a bar that prints nothing (library calls, tests)."""
    stream = file if file is not None else sys.stderr
    unit = f" {unit}"
    if _is_tty(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not enabled, dynamic_ncols=True,
                    bar_format=TTY_FORMAT if total is not None else None)
    return tqdm(total=total, desc=desc, unit=unit, file=_Lines(stream), disable=not enabled, ascii=True,
                mininterval=log_every, maxinterval=max(log_every, 10.0), miniters=1,
                bar_format=LOG_FORMAT if total is not None else LOG_FORMAT_NO_TOTAL)
