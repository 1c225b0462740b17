"""Faults survived (issue 27), with real processes: a worker SIGKILLed or frozen with SIGSTOP under
`torchrun --max-restarts` (real gloo DDP) is restarted, resumes by itself from the newest checkpoint and ends
with the weights of an uninterrupted run, bit for bit; the fault is named in one line and in
RUN/faults.jsonl; a storage that refuses a write (a real RLIMIT_FSIZE) stops the run in one line, exit 74."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from rn50.reliability import integrity
from rn50.reliability.checkpoint import load_checkpoint, regular_checkpoints
from tools.make_dataset import make_dataset

from conftest import ROOT, SHARED_RUN_FLAGS, fixture_folders, run_cli, torchrun


def final_weights(run_dir):
    return load_checkpoint(regular_checkpoints(run_dir)[-1])["model"]


def assert_same_weights(a, b):
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


# The faulted runs keep 1 checkpoint (90 MB each), not the shared run's 4: a restart resumes from the newest alone
KEEP_ONE = ["--keep-checkpoints", "1"]


def with_max_restarts(args: list[str], restarts: int = 2) -> list[str]:
    at = args.index("--nproc-per-node") + 2  # torchrun's own flags end there
    return [*args[:at], "--max-restarts", str(restarts), *args[at:]]


def worker(torchrun_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker process with this RANK (read from its environment)."""
    for child in os.listdir("/proc"):
        if not child.isdigit():
            continue
        try:
            stat = open(f"/proc/{child}/stat").read()
            if int(stat.rsplit(")", 1)[1].split()[1]) != torchrun_pid:
                continue
            env = dict(v.split("=", 1) for v in open(f"/proc/{child}/environ").read().split("\0") if "=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT") == "0":
            return int(child)
    return None


def start(args: list[str], out) -> subprocess.Popen:
    return subprocess.Popen([*args, "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def hit_when(process: subprocess.Popen, ready, signum: int, rank: int = 1) -> int:
    """Send `signum` to worker `rank` once ready() holds; returns its pid."""
    deadline = time.time() + 600
    while not ready() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    victim = worker(process.pid, rank)
    assert victim is not None and process.poll() is None, "the run ended before the fault could be injected"
    os.kill(victim, signum)
    return victim


@pytest.fixture(scope="module")
def ddp_reference(request, data_dir, tmp_path_factory):
    """An uninterrupted two-rank run: the session's shared one (conftest's shared_ddp_run) where there is one."""
    try:
        return request.getfixturevalue("shared_ddp_run")
    except pytest.FixtureLookupError:
        pass
    args = torchrun(2, "-m", "rn50.train", "--data", str(data_dir), *SHARED_RUN_FLAGS, "--base-lr", "0.4")
    out = tmp_path_factory.mktemp("ddp-reference") / "run"
    done = run_cli([*args, "--out", str(out)], timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return SimpleNamespace(args=args, dir=out)


def faults(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "faults.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_sigkilled_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(ddp_reference, tmp_path):
    args = with_max_restarts([*ddp_reference.args, *KEEP_ONE])
    out = tmp_path / "b"
    process = start(args, out)
    victim = hit_when(process, lambda: len(list(out.glob("checkpoint_*.pt"))) >= 1, signal.SIGKILL)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]
    (fault,) = faults(out)
    assert fault["rank"] == 1 and fault["pid"] == victim and fault["restart"] == 1
    assert fault["cause"].startswith("died without a word")
    assert fault["steps_lost"] is not None and 0 <= fault["steps_lost"] <= 2  # a checkpoint every 2 steps
    assert fault["restart_s"] > 0
    assert "restart 1 of 2 (torchrun --max-restarts) after a fault: rank 1" in output
    assert "--resume auto: continuing from" in output
    # the surviving rank's failed collective is one line, not a traceback wall
    assert "a collective failed because another rank is gone" in output and "Traceback" not in output, output[-4000:]
    assert_same_weights(final_weights(ddp_reference.dir), final_weights(out))


@pytest.mark.slow
def test_a_frozen_worker_is_named_by_the_watchdog_and_the_run_restarts(ddp_reference, tmp_path):
    """SIGSTOP: the process lives but never moves; the other rank's watchdog ends the job (exit 4), torchrun
    kills the frozen one and restarts the group."""
    args = with_max_restarts([*ddp_reference.args, "--hang-timeout", "8", *KEEP_ONE])
    out = tmp_path / "b"
    process = start(args, out)
    victim = hit_when(process, lambda: len(list(out.glob("checkpoint_*.pt"))) >= 1, signal.SIGSTOP)
    try:
        output, _ = process.communicate(timeout=900)
    finally:
        try:
            os.kill(victim, signal.SIGKILL)  # never leave a stopped process behind
        except ProcessLookupError:
            pass
    assert process.returncode == 0, output[-4000:]
    (fault,) = faults(out)
    assert fault["rank"] == 1 and fault["pid"] == victim, fault
    assert fault["cause"].startswith("stopped making progress"), fault
    assert "watchdog: stalest rank 1" in output and "no heartbeat" in output
    assert_same_weights(final_weights(ddp_reference.dir), final_weights(out))


@pytest.fixture(scope="module")
def long_validation(request, tmp_path_factory):
    """Data whose validation takes many batches (400 images: 25 batches of 8 per rank), so a fault can land
    in it, and an uninterrupted two-rank run on it (deleted after the module's tests, unless one failed)."""
    folders = fixture_folders(request, tmp_path_factory, "data", "long-val-run")
    data = folders[0] / "long-val"
    make_dataset(data, 4, 12, 100, seed=7, min_side=48, max_side=64)
    args = torchrun(2, "-m", "rn50.train", "--data", str(data), *SHARED_RUN_FLAGS, "--base-lr", "0.4", *KEEP_ONE)
    out = folders[1] / "a"
    done = run_cli([*args, "--out", str(out)], timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return args, out


@pytest.mark.slow
def test_a_worker_killed_during_validation_is_restarted_and_validates_again(long_validation, tmp_path):
    args, uninterrupted = long_validation
    out = tmp_path / "b"
    process = start(with_max_restarts(args), out)
    lines, last_step = [], threading.Event()

    def read() -> None:  # every line as it comes: a reader that lagged behind the run missed validation under load
        for line in process.stdout:
            lines.append(line)
            if line.startswith("epoch 1 step 3/3"):  # rank 0 prints the epoch's last step just before validation
                last_step.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def validating() -> bool:
        if not last_step.is_set():
            return False
        time.sleep(0.3)  # both ranks into the validation of 25 batches each
        return True

    hit_when(process, validating, signal.SIGKILL)
    process.wait(timeout=900)
    reader.join(timeout=60)
    output = "".join(lines)
    assert process.returncode == 0, output[-4000:]
    (fault,) = faults(out)
    assert "validation" in fault["phase"], fault
    assert fault["resumed_step"] == 2  # the last checkpoint before epoch 1's end: step 3 and validation again
    assert fault["steps_lost"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "val/count" in r] == [1, 2]  # epoch 1 validated once, after the restart
    assert all(r["val/count"] == 400 for r in records if "val/count" in r)
    assert_same_weights(final_weights(uninterrupted), final_weights(out))


def test_a_storage_that_refuses_a_checkpoint_stops_the_run_in_one_line_and_keeps_the_previous(shared_run, tmp_path):
    """A real file size limit (RLIMIT_FSIZE, as `ulimit -f`): the next checkpoint write fails with EFBIG (a
    ResNet-18 checkpoint is about 90 MB; the limit is 20 MB). The run stops at that checkpoint with one line
    naming the path and the space needed, exit 74, and the checkpoints already on disk stay valid."""
    out = shared_run.copy_to(tmp_path / "run")
    kept = {p.name: p.read_bytes() for p in regular_checkpoints(out)}

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000_000, 20_000_000))

    done = subprocess.run([*shared_run.args, "--out", str(out), "--resume", "auto", "--epochs", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, preexec_fn=limited,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 74, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not be written" in errors[0] and "(errno EFBIG)" in errors[0], done.stderr[-3000:]
    assert "it needs about" in errors[0] and "free in" in errors[0] and "is intact" in errors[0]
    assert "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in regular_checkpoints(out)} == kept
    assert all(integrity.verify(out / name) for name in kept)
    assert not list(out.glob(".*.tmp"))
