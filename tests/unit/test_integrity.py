"""Checkpoint integrity (issue 27): a SHA-256 and size beside every checkpoint, checked on load; a truncated
or altered newest checkpoint is skipped for the previous one; a storage that refuses a write (full disk,
quota, RLIMIT_FSIZE) stops the run with one line naming the path and the space needed, and never costs the
checkpoints on disk."""

from __future__ import annotations

import errno
import hashlib
import subprocess
import sys

import pytest
import torch

from rn50.reliability import integrity
from rn50.reliability.checkpoint import CheckpointStore, latest_checkpoint, load_checkpoint, remove_stale_temporaries, save_checkpoint
from rn50.config.errors import UserError

from conftest import ROOT


def test_the_sidecar_holds_the_files_sha256_in_sha256sum_format(tmp_path):
    path = tmp_path / "checkpoint_0001.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.randn(100)}})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "checkpoint_0001.sha256").read_text().splitlines()[0] == f"{digest}  checkpoint_0001.pt"
    assert integrity.verify(path) is True
    checked = subprocess.run(["sha256sum", "-c", "checkpoint_0001.sha256"], cwd=tmp_path, capture_output=True,
                             text=True)
    assert checked.returncode == 0 and "OK" in checked.stdout


def test_truncated_or_altered_checkpoints_are_refused_in_words(tmp_path):
    path = tmp_path / "checkpoint_0001.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.randn(50_000)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"truncated: 0\.1 MB of the 0\.2 MB written"):
        load_checkpoint(path)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # one bit inside a tensor: torch.load alone would not notice
    path.write_bytes(bytes(flipped))
    with pytest.raises(UserError, match="corrupt: its SHA-256 differs"):
        load_checkpoint(path)
    path.write_bytes(data)
    assert load_checkpoint(path)["epoch"] == 1


def test_resume_auto_skips_a_corrupt_newest_checkpoint_and_says_why(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=0)
    store.save("checkpoint_0001.pt", {"epoch": 1})
    newest = store.save("checkpoint_0002.pt", {"epoch": 2, "pad": torch.zeros(10_000)})
    newest.write_bytes(newest.read_bytes()[:-100])
    notes = []
    path, state = latest_checkpoint(tmp_path, notes.append)
    assert path.name == "checkpoint_0001.pt" and state["epoch"] == 1
    assert len(notes) == 1 and "skipping" in notes[0] and "truncated" in notes[0]


def test_checkpoints_without_a_sidecar_still_load(tmp_path):
    path = tmp_path / "checkpoint_0001.pt"
    save_checkpoint(path, {"epoch": 1})
    integrity.remove_sidecar(path)  # written before sidecars existed
    assert integrity.verify(path) is False and load_checkpoint(path)["epoch"] == 1


def test_pruning_and_best_keep_their_sidecars_in_step(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for epoch in range(1, 5):
        store.save(f"checkpoint_{epoch:04d}.pt", {"epoch": epoch}, best=epoch == 2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint_0003.pt", "checkpoint_0003.sha256", "checkpoint_0004.pt",
                     "checkpoint_0004.sha256", "checkpoint_best.pt", "checkpoint_best.sha256"]
    assert load_checkpoint(tmp_path / "checkpoint_best.pt")["epoch"] == 2  # checked against its own sidecar
    (tmp_path / "checkpoint_0009.sha256").write_text("x")  # its checkpoint is gone
    (tmp_path / ".checkpoint_0005.sha256.tmp").write_text("x")  # a sidecar write killed midway
    remove_stale_temporaries(tmp_path)
    assert not (tmp_path / "checkpoint_0009.sha256").exists()
    assert not (tmp_path / ".checkpoint_0005.sha256.tmp").exists()
    assert (tmp_path / "checkpoint_0004.sha256").exists()


def test_a_refused_write_is_one_line_naming_the_space_and_the_checkpoints_on_disk_stay(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep_last=2)
    first = store.save("checkpoint_0001.pt", {"epoch": 1})

    def full(obj, handle):
        handle.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(integrity.NotWritten) as refused:
        store.save("checkpoint_0002.pt", {"epoch": 2})
    monkeypatch.undo()
    line = str(refused.value)
    assert "\n" not in line and f"checkpoint {tmp_path / 'checkpoint_0002.pt'} could not be written" in line
    assert "no space left on the device (errno ENOSPC)" in line
    assert f"it needs about {integrity._mb(first.stat().st_size)}" in line and f"free in {tmp_path}" in line
    assert "The previous checkpoint checkpoint_0001.pt is intact" in line and "--resume auto" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_0001.pt", "checkpoint_0001.sha256"]
    assert integrity.verify(first)


def test_a_real_file_size_limit_gives_efbig_not_a_killed_process(tmp_path):
    """RLIMIT_FSIZE is a real storage limit the kernel enforces: past it a write fails (SIGXFSZ ignored)."""
    code = (
        "import resource, sys, torch\n"
        "from rn50.reliability import integrity\n"
        "from rn50.reliability.checkpoint import CheckpointStore\n"
        "integrity.ignore_file_size_signal()\n"
        "store = CheckpointStore(sys.argv[1], keep_last=0)\n"
        "store.save('checkpoint_0001.pt', {'w': torch.zeros(1000)})\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "try:\n"
        "    store.save('checkpoint_0002.pt', {'w': torch.zeros(100_000)})\n"
        "except integrity.NotWritten as err:\n"
        "    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]  # not killed by SIGXFSZ
    assert "file too large for the file system or the process's file size limit (ulimit -f) (errno EFBIG)" in done.stdout
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob(".checkpoint_*.tmp"))
