"""The hang watchdog's report, from heartbeats alone (no processes): its first line names the stalest rank
and that rank's last phase; every rank's state follows. Its thread, in a child process: a compiling section
longer than the timeout is not a hang, a real hang is. The real two-process hang is in test_multinode.py."""

from __future__ import annotations

import re
import sys

from rn50.reliability.exits import EXIT_HUNG
from rn50.reliability.watchdog import hang_report, stalest_rank

from conftest import run_cli

NOW = 10_000.0
FROZEN_AFTER = 6.0  # 3 heartbeat intervals of 2 s
WATCHER = "rank 0 on node0 (pid 100) while epoch 2 step 40/60: training step"


def beat(rank: int, beat_ago: float, progress_ago: float, phase: str) -> dict:
    return {"beat": NOW - beat_ago, "progress": NOW - progress_ago, "phase": phase, "host": f"node{rank // 2}",
            "pid": 100 + rank}


def report(beats: dict, world_size: int | None = None) -> list[str]:
    return hang_report(beats, world_size=len(beats) if world_size is None else world_size, now=NOW,
                       frozen_after_s=FROZEN_AFTER, watcher=WATCHER, stalled_s=9.0, timeout_s=8.0)


def test_first_line_names_the_frozen_rank_not_the_one_waiting_in_a_collective():
    # rank 0 (the watcher) and rank 2 wait in the step's all-reduce: they beat on, without progress;
    # rank 1 was stopped mid-step: its heartbeat stopped 12 s ago
    beats = {0: beat(0, 1, 9, "epoch 2 step 40/60: training step"),
             1: beat(1, 12, 12, "epoch 2 after step 39/60: waiting for the next batch"),
             2: beat(2, 1, 9, "epoch 2 step 40/60: training step")}
    lines = report(beats)
    assert lines[0].startswith("watchdog: stalest rank 1 on node0 (pid 101): no heartbeat for 12 s"), lines
    assert lines[0].endswith("last phase: epoch 2 after step 39/60: waiting for the next batch"), lines
    assert "rank 0" not in lines[0]
    assert lines[1] == f"  ending the job: no progress for 9 s (limit 8 s, --hang-timeout) on {WATCHER}"
    # every rank's state below, in rank order; only rank 1 marked
    states = lines[2:]
    assert [int(re.match(r"  rank (\d+) ", line).group(1)) for line in states] == [0, 1, 2]
    assert [line.endswith("<- stalest") for line in states] == [False, True, False]
    assert states[0] == "  rank 0 on node0 (pid 100): heartbeat 1 s ago, progress 9 s ago, " \
                        "while epoch 2 step 40/60: training step"


def test_the_oldest_heartbeat_wins_among_frozen_ranks():
    beats = {0: beat(0, 1, 9, "a"), 1: beat(1, 7, 7, "b"), 2: beat(2, 30, 30, "c"), 3: beat(3, 8, 8, "d")}
    assert stalest_rank(beats, 4, NOW, FROZEN_AFTER) == 2
    assert report(beats)[0].startswith("watchdog: stalest rank 2 on node1 (pid 102): no heartbeat for 30 s")


def test_without_a_frozen_rank_the_oldest_progress_is_named():
    # every rank beats (e.g. one spins in a slow loop of its own): the one that moved least recently is blamed
    beats = {0: beat(0, 1, 9, "epoch 0 step 5/6: training step"), 1: beat(1, 1, 25, "saving checkpoint_0001.pt")}
    lines = report(beats)
    assert lines[0] == ("watchdog: stalest rank 1 on node0 (pid 101): heartbeat 1 s ago, no progress for 25 s; "
                        "last phase: saving checkpoint_0001.pt")
    assert lines[-1].endswith("while saving checkpoint_0001.pt  <- stalest")


def test_a_rank_that_never_beat_is_named_before_one_that_waits():
    beats = {0: beat(0, 1, 9, "epoch 0 step 1/6: training step"), 1: beat(1, 1, 9, "epoch 0 step 1/6: training step")}
    lines = report(beats, world_size=3)
    assert lines[0].startswith("watchdog: stalest rank 2: no heartbeat ever"), lines
    assert lines[-1] == "  no heartbeat ever from ranks [2]"
    assert not any(line.endswith("<- stalest") for line in lines)
    # but a rank whose heartbeat stopped is still named before it
    beats[1] = beat(1, 20, 20, "epoch 0 step 1/6: training step")
    assert report(beats, world_size=3)[0].startswith("watchdog: stalest rank 1 ")


def test_without_heartbeats_the_watcher_names_itself():
    assert report({}, world_size=1) == [f"watchdog: no progress for 9 s (limit 8 s, --hang-timeout) on {WATCHER}; "
                                        "ending the job"]
    assert stalest_rank({}, 2, NOW, FROZEN_AFTER) is None


# --- the watching thread, in a child process (it ends its process with os._exit) ------------------------

WATCH = """
import sys, time
from rn50.reliability.watchdog import Watchdog
dog = Watchdog(0, 1, timeout_s=1.0, compile_timeout_s={compile_limit})
with dog.compiling("epoch 1 step 1/6: training step"):
    time.sleep({compile_s})  # a compile longer than --hang-timeout, with no progress inside
print("survived the compile", flush=True)
dog.progress("epoch 1 step 2/6: training step")
time.sleep(30)  # a real hang: no progress, outside any compiling section
print("never ends the hang", flush=True)
"""


def watch(compile_limit: float, compile_s: float):
    return run_cli([sys.executable, "-c", WATCH.format(compile_limit=compile_limit, compile_s=compile_s)], timeout=60)


def test_a_compile_longer_than_the_timeout_is_not_a_hang_but_a_real_hang_still_ends_the_job():
    # timeout 1 s (heartbeat every 0.5 s); the compile lasts 4 s, 4x the limit, so a watchdog that ignored
    # the section would fire in it on any machine; the 30 s hang after it must end the process with exit 4
    done = watch(compile_limit=None, compile_s=4.0)
    assert done.returncode == EXIT_HUNG, (done.returncode, done.stdout, done.stderr)
    assert "survived the compile" in done.stdout and "never ends the hang" not in done.stdout, done.stdout
    assert "(limit 1 s, --hang-timeout)" in done.stderr and "while epoch 1 step 2/6: training step" in done.stderr, \
        done.stderr


def test_a_compile_that_hangs_past_its_own_limit_ends_the_job():
    done = watch(compile_limit=2.0, compile_s=30.0)
    assert done.returncode == EXIT_HUNG, (done.returncode, done.stdout, done.stderr)
    assert "survived the compile" not in done.stdout
    assert "(limit 2 s, while compiling (torch.compile))" in done.stderr, done.stderr
    assert "epoch 1 step 1/6: training step (compiling)" in done.stderr, done.stderr
