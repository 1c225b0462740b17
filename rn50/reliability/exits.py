"""The exit codes of `python -m rn50.train` (and of each worker under torchrun): the one table that `main`,
the restart's exit records (`exit_code_of`), the watchdog, the tools and docs/reliability.md's table read.

An exception that ends a run with a code of its own says which (`exit_code`: Preempted, Diverged,
NotWritten); `exit_code_of` reads it, so the mapping from exceptions to codes is written once. No torch here:
the tools import it.
"""

from __future__ import annotations

from rn50.config.errors import UserError

EXIT_FINISHED = 0
EXIT_FAILED = 1  # an unexpected exception, with its traceback
EXIT_USER = 2  # a user error: one `error:` line names the fix
EXIT_DIVERGED = 3  # the loss stayed NaN or inf (Diverged)
EXIT_HUNG = 4  # a rank made no progress (the watchdog)
EXIT_STORAGE = 74  # sysexits' EX_IOERR: the storage refused a checkpoint (not 75: a requeue meets the same disk)
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: a temporary failure, run the same command again
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C: the user stopped it (a requeue on 75 must not)

# code -> what it means, in the order of docs/reliability.md's table (a unit test holds the doc to it)
EXIT_CODES = {
    EXIT_FINISHED: "finished",
    EXIT_FAILED: "a bug (an unexpected exception)",
    EXIT_USER: "a user error",
    EXIT_DIVERGED: "diverged",
    EXIT_HUNG: "a rank hung",
    EXIT_STORAGE: "the storage refused a checkpoint",
    EXIT_PREEMPTED: "preempted (a checkpoint was saved)",
    EXIT_INTERRUPTED: "stopped by Ctrl-C (a checkpoint was saved)",
}


def exit_code_of(exc: BaseException | None) -> int:
    """The exit code `exc` ends this rank with (the table above)."""
    if exc is None:
        return EXIT_FINISHED
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_FAILED
    code = getattr(exc, "exit_code", None)  # Preempted (75, or 130 after Ctrl-C), Diverged, NotWritten
    if isinstance(code, int):
        return code
    return EXIT_USER if isinstance(exc, UserError) else EXIT_FAILED
