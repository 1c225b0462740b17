"""`python -m rn50.recipe [--preset NAME[,NAME]] [--field value ...]`: print the resolved recipe as TOML, without
training (the presets in rn50/presets/ layered left to right, then the flags).

A reader that stops early (`python -m rn50.recipe | head -1`) ends the command quietly with exit code 141, as
the shell's own tools end on SIGPIPE (128 + 13), rather than with a BrokenPipeError traceback: Python's
documented recipe (the signal module's "Note on SIGPIPE"), stdout pointed at /dev/null so that the flush at
exit has nowhere to fail."""

import os
import sys

from rn50.config.cli import main

EXIT_BROKEN_PIPE = 141


def run(argv=None) -> None:
    try:
        main(argv)
        sys.stdout.flush()  # here, inside the try: a pipe closed after the last print fails at this flush
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)


if __name__ == "__main__":
    run()
