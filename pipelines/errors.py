"""The one exception type for user-caused failures (see docs/design.md, Errors).

It lives here, at the bottom of the import graph (pipelines/ imports nothing of ours), and rn50.config.errors
re-exports it, so every layer raises the same type and every CLI catches it once.
"""


class UserError(Exception):
    """A failure the user caused and can fix; the message names the cause and the fix."""
