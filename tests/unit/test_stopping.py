"""The stopping rules as a pure function of the epoch history (rn50.core.stopping.judge)."""

from __future__ import annotations

from rn50.config.recipe import Stopping
from rn50.core.stopping import judge


def epoch(n, top1, val_loss=1.0, train_loss=1.0):
    return {"epoch": n, "time_s": 10.0 * n, "val/top1": top1, "val/loss": val_loss, "train/loss": train_loss}


def test_target_top1_stops_once_and_records_time_and_epochs():
    history = [epoch(1, 40.0), epoch(2, 61.0)]
    verdict, _ = judge(history, Stopping(target_top1=60.0))
    assert verdict == {"stop": "validation top-1 reached the target 60.0%", "target/time_s": 20.0, "target/epochs": 2}
    assert judge(history, Stopping(target_top1=60.0), target_reached_before=True)[0] == {}
    assert judge(history, Stopping(target_top1=70.0))[0] == {}


def test_early_stop_after_patience_epochs_without_a_better_top1():
    history = [epoch(1, 50.0), epoch(2, 55.0), epoch(3, 54.0), epoch(4, 53.0)]
    assert judge(history[:3], Stopping(early_stop_patience=2))[0] == {}
    verdict, _ = judge(history, Stopping(early_stop_patience=2))
    assert verdict["stop"].startswith("no better validation top-1 for 2 epochs (best 55.00% at epoch 2)")
    assert judge(history, Stopping())[0] == {}  # off by default


def test_overfitting_warning_needs_a_gap_that_grew_three_times_in_a_row():
    growing = [epoch(n, 50.0, val_loss=1.0 + 0.1 * n, train_loss=1.0 - 0.1 * n) for n in range(1, 5)]
    verdict, warnings = judge(growing, Stopping())
    assert verdict == {"warn/overfitting": True} and "0.200 -> 0.800" in warnings[0]
    flat_once = growing[:2] + [epoch(3, 50.0, val_loss=1.2, train_loss=0.8)] + growing[3:]
    assert judge(flat_once, Stopping()) == ({}, [])
    assert judge(growing[:3], Stopping()) == ({}, [])


def test_no_overfitting_warning_on_a_healthy_run_whose_gap_grows():
    """Issue 23, 3.4: `make run` reached 100% top-1 with the validation loss below the training loss throughout
    (label smoothing and augmentation raise the training loss); the gap still grew (-1.0 -> -0.45) and the old
    rule warned. A validation loss that keeps falling is no overfitting either, even above the training loss."""
    below = [epoch(n, 100.0, val_loss=v, train_loss=t)
             for n, (v, t) in enumerate([(1.0, 2.0), (0.8, 1.6), (0.7, 1.3), (0.65, 1.1)], start=1)]
    assert judge(below, Stopping()) == ({}, [])
    still_falling = [epoch(n, 60.0, val_loss=v, train_loss=t)
                     for n, (v, t) in enumerate([(1.5, 1.4), (1.4, 1.2), (1.35, 1.0), (1.3, 0.8)], start=1)]
    assert judge(still_falling, Stopping()) == ({}, [])
    rising = still_falling[:3] + [epoch(4, 60.0, val_loss=1.6, train_loss=0.8)]
    rising[0] = epoch(1, 60.0, val_loss=1.3, train_loss=1.2)  # the gap grows every epoch and val loss rose
    verdict, warnings = judge(rising, Stopping())
    assert verdict == {"warn/overfitting": True} and "1.300 -> 1.600" in warnings[0]
