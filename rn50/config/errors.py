"""User-caused failures: one exception type, shared with pipelines/ (defined there, the lowest layer), and
the early flag check of the commands."""

import sys

from pipelines.errors import UserError

__all__ = ["NodeWideError", "UserError", "check_flags_first"]


class NodeWideError(UserError):
    """A user error every process of a node meets alike (a file missing from the node's torch hub cache): under
    torchrun, each node's local rank 0 alone says it, so that 8 processes print one line, not 8."""


def check_flags_first(parse_args) -> None:
    """For a command run as `python -m ...`, called before its heavy imports (torch, DALI: seconds): read the
    flags now, so that a mistyped one is its one `error:` line and exit 2 at once (and --help is quick).
    main() reads them again, which costs nothing."""
    try:
        parse_args()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
