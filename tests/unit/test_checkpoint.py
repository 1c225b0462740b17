"""Checkpoints are written atomically and read back exactly; a bad file is a clear error."""

from __future__ import annotations

import pytest
import torch

from rn50.reliability.checkpoint import load_checkpoint, save_checkpoint
from rn50.config.errors import UserError


def test_round_trip(tmp_path):
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "recipe": {"lr_milestones": (30.0,)}, "dali": "x"}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "c.pt", {"epoch": 1})

    def crash(obj, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process dies while writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "c.pt", {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "c.pt")["epoch"] == 1
    # no temporary file left behind; the first checkpoint's digest stays beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.sha256"]


def test_corrupt_or_missing_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def test_remove_stale_temporaries_removes_only_our_own(tmp_path):
    import signal
    import subprocess
    import sys

    from rn50.reliability.checkpoint import remove_stale_temporaries

    from conftest import ROOT

    # a real writer killed mid-write (SIGKILL inside torch.save): the temporary it leaves has the real name
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys, torch\n"
        "from rn50.reliability.checkpoint import save_checkpoint\n"
        "def dies(obj, handle):\n"
        "    handle.write(b'half a checkpoint'); handle.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = dies\n"
        "save_checkpoint(sys.argv[1], {'epoch': 1})\n"), str(tmp_path / "checkpoint_0001_step00000012.pt")],
        cwd=ROOT, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (from_writer,) = tmp_path.glob(".checkpoint_0001_step00000012.pt.*.tmp")

    stale = tmp_path / ".checkpoint_0001_step00000099.pt.stale1234.tmp"
    stale.write_bytes(b"x" * 1000)
    keep = ["checkpoint_0001.pt", "checkpoint_0002_step00000099.pt", "checkpoint_best.pt", "notes.tmp",
            "metrics.jsonl", ".checkpoint_0001.pt", "checkpoint_0001.pt.abcd1234.tmp",  # no leading dot
            ".checkpoint_0001.pt.tmp", ".checkpoint_1.pt.abcd1234.tmp", ".other_0001.pt.abcd1234.tmp",
            ".checkpoint_0001.pt.abcd1234.tmp.bak", ".checkpoint_best.pt.link"]
    for name in keep:
        (tmp_path / name).write_bytes(b"keep")
    (tmp_path / ".checkpoint_0003.pt.adir1234.tmp").mkdir()  # a folder of that name is not ours to delete

    removed = remove_stale_temporaries(tmp_path)
    assert removed == sorted([from_writer, stale])
    assert not from_writer.exists() and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, ".checkpoint_0003.pt.adir1234.tmp"])
    assert remove_stale_temporaries(tmp_path) == []  # nothing left to remove


def test_remove_stale_temporaries_leaves_a_finished_checkpoint(tmp_path):
    from rn50.reliability.checkpoint import remove_stale_temporaries

    save_checkpoint(tmp_path / "checkpoint_0001.pt", {"epoch": 1})
    assert remove_stale_temporaries(tmp_path) == []
    assert load_checkpoint(tmp_path / "checkpoint_0001.pt")["epoch"] == 1
