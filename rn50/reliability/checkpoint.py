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

from rn50.reliability import integrity
from rn50.config.errors import UserError

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
            digest, size = integrity.write_with_digest(handle, lambda out: torch.save(state, out))
            handle.flush()
            os.fsync(handle.fileno())
        integrity.remove_sidecar(path)  # never an old digest beside the new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    integrity.write_sidecar(path, digest, size)  # checkpoint_0003.sha256, checked by load_checkpoint
    _fsync_dir(path.parent)


class Unusable(UserError):
    """A checkpoint that cannot be loaded; `reason`: why, in a few words (the integrity check's, or the load's)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass --resume with a checkpoint_*.pt from a run folder "
                        "or --resume auto")
    try:
        integrity.verify(path)  # against the SHA-256 and size written beside it, where there is one
    except integrity.Corrupt as exc:
        raise Unusable(f"checkpoint {path} cannot be used: {exc}; resume from an earlier checkpoint in the same "
                       "run folder", f"{exc} (the integrity check against {integrity.sidecar(path).name})") from None
    try:
        # weights_only: a checkpoint is tensors, numbers and strings; nothing in it may run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise Unusable(f"checkpoint {path} cannot be read ({type(exc).__name__}); resume from an earlier "
                       "checkpoint in the same run folder", f"torch.load failed ({type(exc).__name__})") from None


def checkpoint_name(epochs_done: int, step: int, epoch_end: bool) -> str:
    return f"checkpoint_{epochs_done:04d}.pt" if epoch_end else f"checkpoint_{epochs_done:04d}_step{step:08d}.pt"


# save_checkpoint's temporary files: mkstemp(prefix=".<checkpoint name>.", suffix=".tmp")
_TEMPORARY = re.compile(r"^\.checkpoint_(\d{4}(_step\d{8})?|best)\.pt\..+\.tmp$")


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporary files of checkpoint writes that never finished (a kill mid-write leaves one,
    as large as a checkpoint). Only our own names; call it when no write is under way (at start-up)."""
    removed = []
    for path in Path(run_dir).glob(".checkpoint_*.tmp"):
        if _TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    for path in integrity.stale_sidecars(run_dir):  # a digest whose checkpoint is gone, or a half-written one
        path.unlink(missing_ok=True)
    return sorted(removed)


def regular_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint of the run but the best-link, oldest first."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*.pt") if _REGULAR.match(p.name))


class CheckpointStore:
    def __init__(self, run_dir: Path, keep_last: int):
        self.run_dir, self.keep_last = Path(run_dir), keep_last
        integrity.ignore_file_size_signal()  # past `ulimit -f` a save fails with EFBIG (reported), not SIGXFSZ

    def save(self, name: str, state: dict, best: bool = False) -> Path:
        """The path written. A storage that refuses it (full, over quota, the file size limit, failing)
        raises integrity.NotWritten: the checkpoints already on disk stay as they were."""
        path = self.run_dir / name
        try:
            save_checkpoint(path, state)
        except Exception as exc:
            if integrity.storage_error(exc) is None:
                raise
            on_disk = regular_checkpoints(self.run_dir)
            previous = [p for p in on_disk if p != path]
            raise integrity.not_written(path, exc, on_disk, previous[-1].stat().st_size if previous else None) \
                from None
        if best:
            self._link_best(path)
        self._prune()
        return path

    def _link_best(self, path: Path) -> None:
        tmp = self.run_dir / f".{BEST}.link"
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        integrity.remove_sidecar(self.run_dir / BEST)
        os.replace(tmp, self.run_dir / BEST)
        if integrity.read_sidecar(path):
            integrity.write_sidecar(self.run_dir / BEST, *integrity.read_sidecar(path))
        _fsync_dir(self.run_dir)

    def _prune(self) -> None:
        if self.keep_last > 0:
            for old in regular_checkpoints(self.run_dir)[: -self.keep_last]:
                old.unlink(missing_ok=True)
                integrity.remove_sidecar(old)


def latest_checkpoint(run_dir: Path, say=print, refused: list | None = None) -> tuple[Path, dict] | None:
    """The newest checkpoint in the run folder that loads; unreadable ones are skipped with a note (and
    `refused` gets (path, reason) for each)."""
    for path in reversed(regular_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except UserError as err:
            say(f"skipping {path}: {err}")
            if refused is not None:
                refused.append((path, getattr(err, "reason", str(err))))
    return None


# --- what a checkpoint holds ------------------------------------------------------------------------

def training_state(parts, *, epochs_done: int, step: int, steps_per_epoch: int, plateau: dict,
                   loader_states: list, loader_kind: str, recipe: dict, world_size: int, history: list,
                   elapsed_s: float, epoch_losses: list | None = None, data: dict | None = None) -> dict | None:
    """Everything an exact resume needs, for a checkpoint; None when the weights hold NaN or inf (a kept
    checkpoint must stay a good one). `parts` is rn50.core.step.TrainingParts."""
    weights = parts.raw_model.state_dict()
    if not all(t.isfinite().all() for t in weights.values() if t.is_floating_point()):
        return None
    return {
        "epoch": epochs_done,  # epochs completed
        "step": step,  # optimizer steps done in all
        "steps_per_epoch": steps_per_epoch,
        "model": weights,
        "optimizer": parts.optimizer.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "plateau": plateau,
        "loader": loader_states,  # one state per rank: its shard and its augmentation stream
        "loader_kind": loader_kind,
        # the training file list the loader states belong to (rn50.core.loaders.data_identity): count and digest
        "data": data,
        # mid-epoch: each rank's running loss sums for the epoch so far (rn50.observe.meter.LossTracker.state_dict)
        "epoch_losses": epoch_losses,  # another loader cannot take these states: the epoch restarts
        "recipe": recipe,  # sectioned (older checkpoints: flat), read with rn50.config.recipe.resolve(saved=...)
        "world_size": world_size,
        "history": history,  # one record per finished epoch
        "elapsed_s": elapsed_s,
    }


def restore_training(parts, state: dict, fresh_optimizer: bool = False) -> None:
    """Weights, optimizer, scaler and EMA from a checkpoint into `parts` (rn50.core.step.TrainingParts).

    `fresh_optimizer` (another optimizer than the checkpoint's, allowed on resume): its state starts fresh,
    since SGD's momentum buffers mean nothing to AdamW. Otherwise the saved state (momentum, Adam moments,
    step counts) is restored, and the hyperparameters of the groups as this run built them are kept: a
    weight decay or momentum changed with --allow-change applies (load_state_dict alone would bring back the
    saved ones; the LR is set every step anyway)."""
    parts.raw_model.load_state_dict(state["model"])
    if not fresh_optimizer:
        built = [{k: v for k, v in group.items() if k != "params"} for group in parts.optimizer.param_groups]
        parts.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(parts.optimizer.param_groups, built):
            group.update(settings)
    if state.get("scaler"):  # empty when saved by a disabled GradScaler (no fp16): nothing to bring back
        parts.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None and state.get("ema") is not None:
        parts.ema.load_state_dict(state["ema"])
