"""rn50.reliability.restart's pure parts (issue 27): --checkpoint-every as steps or a time, the step a phase had
reached, and naming the fault of a failed attempt from its heartbeats and exit records."""

from __future__ import annotations

import argparse

import pytest

from rn50.reliability import restart
from rn50.reliability.restart import CheckpointCadence, name_fault, step_reached
from rn50.config.run_settings import Seconds, parse_every


def test_checkpoint_every_takes_steps_or_a_time():
    assert parse_every("500") == 500 and not isinstance(parse_every("500"), Seconds)
    assert parse_every("0") == 0
    assert parse_every("10m") == Seconds(600) and parse_every("30s") == 30 and parse_every("1.5h") == 5400
    for bad in ("5x", "-3", "m", "0m", "ten"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"a number of steps \(500\) or a time"):
            parse_every(bad)


def test_cadence_by_steps_and_by_time(monkeypatch):
    steps = CheckpointCadence(4, check_every=1)
    assert [s for s in range(1, 13) if steps.due(s)] == [4, 8, 12]
    assert not CheckpointCadence(0, 1) and not CheckpointCadence(0, 1).due(10)
    clock = [100.0]
    monkeypatch.setattr(restart.time, "monotonic", lambda: clock[0])
    timed = CheckpointCadence(Seconds(60), check_every=10)
    due = []
    for step in range(1, 101):
        clock[0] += 4.0  # 4 s a step: 60 s pass every 15 steps, looked at every 10
        if timed.due(step):
            due.append(step)
    assert due == [20, 40, 60, 80, 100]


def test_step_reached_reads_the_watchdogs_phases():
    assert step_reached("epoch 2 step 3/6: training step", 6) == 8  # step 9 under way: 8 done
    assert step_reached("epoch 2 after step 3: waiting for the next batch", 6) == 9
    assert step_reached("epoch 1: validation batch 4", 6) == 6
    assert step_reached("saving a checkpoint at epoch 2 step 4", 6) == 10
    assert step_reached("starting: building the model", 6) is None


def beat(t, phase, pid):
    return {"beat": t, "progress": t, "phase": phase, "host": "node0", "pid": pid}


def test_a_silent_death_is_named_before_the_ranks_that_only_saw_it():
    previous = {"beats": {0: beat(110.0, "epoch 1 after step 4: waiting for the next batch", 10),
                          1: beat(100.0, "epoch 1 step 4/6: training step", 11)},
                "exits": {0: {"code": 1, "reason": "peer lost: RuntimeError: Connection reset by peer", "time": 111.0}}}
    fault = name_fault(previous, steps_per_epoch=6)
    assert fault["rank"] == 1 and fault["pid"] == 11 and fault["cause"].startswith("died without a word")
    assert fault["fault_time"] == 100.0 and fault["step_reached"] == 4


def test_the_watchdogs_exit_names_the_frozen_rank():
    previous = {"beats": {0: beat(130.0, "epoch 1 after step 2: waiting for the next batch", 10),
                          1: beat(100.0, "epoch 1 step 3/6: training step", 11)},
                "exits": {0: {"code": 4, "reason": "watchdog: stalest rank 1 on node0 (pid 11): no heartbeat for 30 s",
                              "time": 131.0}}}
    fault = name_fault(previous, steps_per_epoch=6)
    assert fault["rank"] == 1 and fault["cause"].startswith("stopped making progress")
    assert "watchdog on rank 0" in fault["cause"]


def test_a_crash_is_named_with_its_exception():
    previous = {"beats": {0: beat(100.0, "epoch 1 step 2/6: training step", 10),
                          1: beat(100.0, "epoch 1 step 2/6: training step", 11)},
                "exits": {1: {"code": 1, "reason": "OSError: [Errno 5] Input/output error", "time": 100.5},
                          0: {"code": 1, "reason": "peer lost: RuntimeError: Connection closed by peer", "time": 100.6}}}
    fault = name_fault(previous, steps_per_epoch=6)
    assert fault["rank"] == 1 and fault["cause"] == "crashed (exit 1: OSError: [Errno 5] Input/output error)"


def test_without_a_record_the_cause_is_unknown_in_words():
    assert name_fault(None, 6)["cause"].startswith("unknown")


def test_peer_lost_recognises_gloo_and_nccl_wordings():
    assert restart.peer_lost(RuntimeError("[pair.cc:545] Read error [127.0.0.1]:3491: Connection reset by peer"))
    assert restart.peer_lost(RuntimeError("NCCL error: remote process exited or there was a network error"))
    assert not restart.peer_lost(RuntimeError("CUDA out of memory"))
    assert not restart.peer_lost(ValueError("Connection reset by peer"))
