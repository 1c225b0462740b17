"""Checkpoints: written atomically (temporary file, fsync, rename), so a crash mid-write leaves the last
good checkpoint intact."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from rn50.errors import UserError


def save_checkpoint(path: Path, state: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; checkpoints are shared artefacts
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass --resume with a checkpoint_*.pt from a run folder")
    try:
        # weights_only: a checkpoint is tensors, numbers and strings; nothing in it may run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}); "
                        "resume from an earlier checkpoint in the same run folder") from None
