"""User-caused failures: one exception type, shared with pipelines/ (defined there, the lowest layer)."""

from pipelines.errors import UserError

__all__ = ["UserError"]
