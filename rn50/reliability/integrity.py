"""Checkpoint integrity and storage faults: a SHA-256 beside every checkpoint, checked before it is loaded,
and a full or failing disk turned into one line and a stop, with the previous checkpoint intact.

- `write_with_digest(handle, save)`: runs `save(writer)` through a writer that hashes the bytes as they go
  out (no second read of a 200 MB file) and returns (digest, size).
- `write_sidecar(path, digest, size)`: `checkpoint_0003.sha256` beside `checkpoint_0003.pt`, in
  `sha256sum` format (`sha256sum -c checkpoint_0003.sha256` checks it by hand), written atomically.
- `verify(path)`: raises `Corrupt` when the file is shorter than written (truncated: a copy or a disk that
  lost its tail) or its digest differs (bit rot, a partial overwrite). A checkpoint without a sidecar
  (written before sidecars existed, or killed between the rename and the sidecar) is accepted unchecked.
- `storage_error(exc)`: the words for an OSError of the storage (ENOSPC, EDQUOT, EFBIG, EIO, EROFS), or
  None for other errors; `NotWritten` the stop it causes (exit EXIT_STORAGE), its line naming the path, the
  space needed and the space free; `ignore_file_size_signal()` makes RLIMIT_FSIZE (`ulimit -f`) give EFBIG
  instead of killing the process with SIGXFSZ.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import signal
from pathlib import Path

from rn50.reliability.exits import EXIT_STORAGE

SUFFIX = ".sha256"
_CHUNK = 1 << 22

# errors that mean the storage cannot take the file (and that freeing space or another --out cures)
_STORAGE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large for the file system or the process's file size limit (ulimit -f)",
            errno.EIO: "input/output error (a failing disk or a lost network file system)",
            errno.EROFS: "read-only file system"}


class Corrupt(Exception):
    """A checkpoint whose bytes are not the ones written (the message says how)."""


class _HashingWriter(io.RawIOBase):
    """Forwards writes to `handle`, hashing them. Not seekable, so torch.save writes it front to back."""

    def __init__(self, handle):
        super().__init__()
        self.handle, self.hash, self.size = handle, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch.save hides a failed write behind its own RuntimeError

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += view.nbytes
        try:
            self.handle.write(view)
        except OSError as exc:
            self.error = exc
            raise
        return view.nbytes

    def flush(self) -> None:
        self.handle.flush()


def write_with_digest(handle, save) -> tuple[str, int]:
    """`save(writer)` writes the checkpoint through a hashing writer; returns (sha256 hex, bytes written)."""
    writer = _HashingWriter(handle)
    try:
        save(writer)
        writer.flush()
    except Exception:
        if writer.error is not None:  # the storage's own error (ENOSPC, EFBIG, ...), not torch's wrapping
            raise writer.error from None
        raise
    return writer.hash.hexdigest(), writer.size


def sidecar(path: Path) -> Path:
    """checkpoint_0003.pt -> checkpoint_0003.sha256: beside it, but outside globs such as `*.pt*`."""
    return Path(path).with_suffix(SUFFIX)


def write_sidecar(path: Path, digest: str, size: int) -> None:
    """`<digest>  <name>` (sha256sum's format) plus the size, atomically; rank 0 alone writes it."""
    path = Path(path)
    target = sidecar(path)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(f"{digest}  {path.name}\n# size {size}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)


def read_sidecar(path: Path) -> tuple[str, int | None] | None:
    try:
        lines = sidecar(path).read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    digest = lines[0].split()[0] if lines and lines[0].split() else ""
    size = next((int(line.split()[-1]) for line in lines[1:] if line.startswith("# size ")), None)
    return (digest, size) if len(digest) == 64 else None


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size} bytes"


def verify(path: Path) -> bool:
    """True when checked against its sidecar, False when there is none; raises Corrupt on a mismatch."""
    expected = read_sidecar(path)
    if expected is None:
        return False
    digest, size = expected
    actual_size = Path(path).stat().st_size
    if size is not None and actual_size < size:
        raise Corrupt(f"truncated: {_mb(actual_size)} of the {_mb(size)} written")
    if size is not None and actual_size > size:
        raise Corrupt(f"{_mb(actual_size - size)} longer than written")
    if file_digest(path) != digest:
        raise Corrupt(f"corrupt: its SHA-256 differs from the one written beside it ({sidecar(path).name})")
    return True


def remove_sidecar(path: Path) -> None:
    sidecar(path).unlink(missing_ok=True)


def stale_sidecars(run_dir: Path) -> list[Path]:
    """Sidecars whose checkpoint is gone, and sidecar writes that never finished."""
    run_dir = Path(run_dir)
    stale = [p for p in run_dir.glob(f".checkpoint_*{SUFFIX}.tmp") if p.is_file()]
    stale += [p for p in run_dir.glob(f"checkpoint_*{SUFFIX}") if not p.with_suffix(".pt").exists()]
    return sorted(stale)


def storage_error(exc: BaseException) -> str | None:
    """What an OSError says about the storage, in words; None when it is no storage fault."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE:
        return f"{_STORAGE[exc.errno]} (errno {errno.errorcode[exc.errno]})"
    # torch.save reports a failed write of its zip writer as a RuntimeError naming the file's errno text
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("file write failed" in text or "unexpected pos" in text):
        return f"the write failed ({text.splitlines()[0][:160]})"
    return None


class NotWritten(Exception):
    """A checkpoint the storage refused: the run stops (exit EXIT_STORAGE) with `line`, the previous
    checkpoint intact (the write went to a temporary file, now removed). Training on without checkpoints
    would put every later step at risk without a word."""

    exit_code = EXIT_STORAGE


def not_written(path: Path, exc: BaseException, on_disk: list[Path], needed: int | None) -> NotWritten:
    """The stop for a checkpoint the storage refused: one line naming the path, the space the checkpoint
    needs (`needed`: its size as written so far, or the previous one's) and the space free there."""
    path = Path(path)
    previous = next((p for p in reversed(on_disk) if p != path), None)
    free = shutil.disk_usage(path.parent).free
    size = f"it needs about {_mb(needed)}, " if needed else ""
    line = (f"checkpoint {path} could not be written: {storage_error(exc)}; {size}{_mb(free)} free in "
            f"{path.parent}. " + (f"The previous checkpoint {previous.name} is intact: free space (or raise the "
                                  "limit) and run the same command with --resume auto"
                                  if previous else "No checkpoint was written yet: free space (or raise the limit) "
                                                   "and run the same command again"))
    return NotWritten(line)


def ignore_file_size_signal() -> None:
    """Past RLIMIT_FSIZE a write raises SIGXFSZ, whose default action kills the process with a core dump;
    ignored, the write fails with EFBIG and the checkpoint save reports it like a full disk."""
    try:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except (AttributeError, ValueError):  # no such signal here, or not the main thread: keep the default
        pass
