"""Checkpoints are written atomically and read back exactly; a bad file is a clear error."""

from __future__ import annotations

import pytest
import torch

from rn50.checkpoint import load_checkpoint, save_checkpoint
from rn50.errors import UserError


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
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_corrupt_or_missing_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
