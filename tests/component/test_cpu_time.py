"""benchmarks.cpu_time: the loader shootout's CPU time counts the row's descendants (DataLoader workers,
decoding processes), alive or reaped, and settle() finds the moment they stop."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.cpu_time import Tree, settle

BURN_S = 0.4
# A child that burns BURN_S of CPU (its own clock, so a busy machine stretches the wall time, not the CPU), says
# so, then waits on stdin: alive when it is read
BURNER = f"""
import sys, time
end = time.process_time() + {BURN_S}
while time.process_time() < end:
    pass
print("burnt", flush=True)
sys.stdin.readline()
"""
# Read from /proc in clock ticks (10 ms), and a process's own accounting lags by up to a tick: the burn counts
# within 0.1 s of BURN_S (measured: 0.40-0.42 s over 10 runs on a 2-core machine beside other jobs)
SLACK_S = 0.1


def burner(*wrap: str) -> subprocess.Popen:
    return subprocess.Popen([*wrap, sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def test_a_live_childs_cpu_time_counts():
    tree = Tree()
    before = tree.read()
    child = burner()
    try:
        assert child.stdout.readline().strip() == "burnt"
        spent = tree.refresh().read() - before
    finally:
        child.communicate("\n")
    assert BURN_S - SLACK_S <= spent <= BURN_S + SLACK_S + 0.3, spent  # + the child's interpreter start-up


def test_a_grandchild_counts_alive_and_after_it_is_reaped():
    tree = Tree()
    before = tree.read()
    # a shell in between: the burner is this process's grandchild
    child = burner("sh", "-c", '"$@"; true', "sh")
    try:
        assert child.stdout.readline().strip() == "burnt"
        alive = tree.refresh().read() - before
    finally:
        child.communicate("\n")
    reaped = tree.refresh().read() - before  # the shell reaped the burner, this process reaped the shell
    assert alive >= BURN_S - SLACK_S, alive
    assert reaped >= alive - SLACK_S, (alive, reaped)


ITEM_S = 0.1


class Burn(Dataset):
    """Each item burns ITEM_S of CPU, once `go` is set: the workers start idle, so a reading taken before `go`
    counts none of their work, however late a busy machine runs this thread."""

    def __init__(self):
        self.go = multiprocessing.get_context("fork").Event()

    def __len__(self):
        return 8

    def __getitem__(self, index):
        self.go.wait()
        end = time.process_time() + ITEM_S
        while time.process_time() < end:
            pass
        return torch.zeros(1)


def test_dataloader_workers_cpu_counts_and_settle_waits_for_it():
    data = Burn()
    loader = iter(DataLoader(data, batch_size=1, num_workers=2, prefetch_factor=2, persistent_workers=True,
                             multiprocessing_context="fork"))
    tree = Tree()  # the two workers, waiting on `go`
    polls, start = time.thread_time(), tree.read()
    data.go.set()
    next(loader)  # item 0; the workers hold items 1-4 (2 x prefetch 2, item 4 sent when item 0 arrived)
    ended, settled = settle(tree)
    spent = tree.read() - (time.thread_time() - polls) - start
    assert settled
    # items 0-4, the workers' CPU, not this thread's polling (a tree without its children reads about 0)
    assert 5 * ITEM_S - SLACK_S <= spent <= 5 * ITEM_S + SLACK_S, spent
    assert ended <= time.perf_counter() - 0.25  # the moment the burn ended, not the end of the quiet wait
    del loader
