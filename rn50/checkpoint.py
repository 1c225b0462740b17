"""Checkpoints: written atomically (temporary file, fsync, rename), so a crash mid-write leaves the last
good checkpoint intact; the last K kept, plus the best by validation top-1.

Names sort in the order they were written: `checkpoint_0003.pt` after 3 epochs,
`checkpoint_0003_step00001250.pt` mid-epoch (3 epochs done, 1,250 steps in all), `checkpoint_best.pt`
a hard link to the best epoch's file (no extra space, and it survives the pruning of its first name).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from rn50.errors import UserError

_REGULAR = re.compile(r"^checkpoint_\d{4}(_step\d{8})?\.pt$")
BEST = "checkpoint_best.pt"


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
    _fsync_dir(path.parent)


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass --resume with a checkpoint_*.pt from a run folder "
                        "or --resume auto")
    try:
        # weights_only: a checkpoint is tensors, numbers and strings; nothing in it may run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}); "
                        "resume from an earlier checkpoint in the same run folder") from None


def checkpoint_name(epochs_done: int, step: int, epoch_end: bool) -> str:
    return f"checkpoint_{epochs_done:04d}.pt" if epoch_end else f"checkpoint_{epochs_done:04d}_step{step:08d}.pt"


def regular_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint of the run but the best-link, oldest first."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*.pt") if _REGULAR.match(p.name))


class CheckpointStore:
    def __init__(self, run_dir: Path, keep_last: int):
        self.run_dir, self.keep_last = Path(run_dir), keep_last

    def save(self, name: str, state: dict, best: bool = False) -> Path:
        path = self.run_dir / name
        save_checkpoint(path, state)
        if best:
            self._link_best(path)
        self._prune()
        return path

    def _link_best(self, path: Path) -> None:
        tmp = self.run_dir / f".{BEST}.link"
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        os.replace(tmp, self.run_dir / BEST)
        _fsync_dir(self.run_dir)

    def _prune(self) -> None:
        if self.keep_last > 0:
            for old in regular_checkpoints(self.run_dir)[: -self.keep_last]:
                old.unlink(missing_ok=True)


def latest_checkpoint(run_dir: Path, say=print) -> tuple[Path, dict] | None:
    """The newest checkpoint in the run folder that loads; unreadable ones are skipped with a note."""
    for path in reversed(regular_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except UserError as err:
            say(f"skipping {path}: {err}")
    return None
