"""Scale-out on one machine: two simulated nodes over a loopback c10d rendezvous, and a rank that dies
or hangs ending the whole job within a bounded time, with the rank named."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import N_VAL_IMAGES, ROOT

pytestmark = pytest.mark.slow
SMALL = ["--loader", "dali-cpu", "--arch", "resnet18", "--image-size", "32", "--batch-size", "4",
         "--dali-threads", "1", "--log-every", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: list[str], *rendezvous: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", *(rendezvous or ("--standalone",)),
               "--nproc-per-node", str(nproc), "-m", "rn50.train", *args]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_two_nodes_of_two_processes_on_a_loopback_rendezvous(data_dir, tmp_path):
    port = free_port()
    common = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t2n"]
    out = tmp_path / "run"
    args = ["--data", str(data_dir), "--out", str(out), "--epochs", "1", *SMALL]
    nodes = [launch(2, args, *common, "--node-rank", str(n)) for n in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["global_batch"] == 16
    assert summary["final"]["val/count"] == N_VAL_IMAGES  # 44 images over 4 ranks, each counted once
    assert summary["ddp/replicas_identical"] is True
    # rank 0 alone prints: exactly one "epoch 1/1" line over both nodes
    assert sum(o.count("epoch 1/1:") for o in outputs) == 1


def workers_of(launcher: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (read from /proc)."""
    workers = {}
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    for pid in map(int, children.read_text().split()):
        try:
            env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if "RANK" in env:
            workers[int(env["RANK"])] = pid
    return workers


def wait_for_training(run_dir: Path, launcher: subprocess.Popen) -> dict[int, int]:
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None:
        if (run_dir / "metrics.jsonl").exists():  # past start-up, inside the training loop
            workers = workers_of(launcher)
            if len(workers) == 2:
                return workers
        time.sleep(0.1)
    raise AssertionError("training did not start")


def test_a_dead_rank_ends_the_job_and_is_named(data_dir, tmp_path):
    out = tmp_path / "run"
    launcher = launch(2, ["--data", str(data_dir), "--out", str(out), "--epochs", "50", *SMALL])
    workers = wait_for_training(out, launcher)
    killed_at = time.time()
    os.kill(workers[1], signal.SIGKILL)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode != 0
    assert time.time() - killed_at < 60, "the job must end promptly, not hang"
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", output), output[-3000:]  # torchrun names the dead rank
    assert "exitcode  : -9" in output


def test_a_hung_rank_ends_the_job_within_the_timeout_and_is_named(data_dir, tmp_path):
    out = tmp_path / "run"
    launcher = launch(2, ["--data", str(data_dir), "--out", str(out), "--epochs", "50", "--hang-timeout", "8",
                          *SMALL])
    workers = wait_for_training(out, launcher)
    time.sleep(3)  # a heartbeat or two from inside the training loop
    stopped_at = time.time()
    os.kill(workers[1], signal.SIGSTOP)  # alive but frozen: the case no exit code reveals
    try:
        output = launcher.communicate(timeout=180)[0]
    finally:
        try:
            os.kill(workers[1], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert launcher.returncode != 0
    assert time.time() - stopped_at < 8 + 30 + 30  # the timeout, torchrun's 30 s grace, margin
    # the watchdog's first line names rank 1, the frozen one, with what it was doing at its last heartbeat
    # (not rank 0, which only waits for it in a collective); every rank's state follows
    first = re.search(r"^.*watchdog: .*$", output, re.MULTILINE)
    assert first, output[-3000:]
    assert re.search(r"watchdog: stalest rank 1 on .*: no heartbeat for \d+ s.*; last phase: (epoch|saving)",
                     first.group(0)), output[-3000:]
    assert "ending the job: no progress for" in output, output[-3000:]
    assert re.search(r"rank 0 on .* while ", output) and re.search(r"rank 1 on .* while (epoch|saving).*<- stalest",
                                                                   output), output[-3000:]
