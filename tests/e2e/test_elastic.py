"""Elastic world size (issue 27, item 3), with real processes: two torchrun agents `--nnodes 1:2` on one
machine over a c10d rendezvous on the loopback interface. One agent is killed mid-epoch (SIGKILL to its
process group: a lost machine); the other continues at world size 1 from the last checkpoint; a third agent
joins later and the group grows back to 2. Counted with RN50_SAMPLE_LOG (pipelines.order): every training
image of every epoch, the interrupted ones included, is used exactly once (except a tail short of a global
batch, which the resume line names), and every validation counts all the validation images."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from tools.make_dataset import make_dataset

from conftest import ROOT

pytestmark = pytest.mark.slow

TRAIN, VAL = 48, 15  # 3 classes of 16 and of 5: 15 validation images do not split evenly over 2 ranks
BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent(port: int, data, out, log_dir, log_file) -> subprocess.Popen:
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "elastic-test",
            "--rdzv-conf", "last_call_timeout=2", "--max-restarts", "3", "--monitor-interval", "0.5",
            "-m", "rn50.train", "--data", str(data), "--out", str(out), "--resume", "auto",
            "--loader", "torchvision", "--workers", "0", "--arch", "resnet18", "--image-size", "32",
            "--batch-size", str(BATCH), "--epochs", "5", "--warmup-epochs", "1", "--checkpoint-every", "1",
            "--keep-checkpoints", "2", "--seed", "3", "--log-every", "1", "--hang-timeout", "60"]
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: torch 2.14's shared store hangs a joining node (docs/reliability.md)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RN50_SAMPLE_LOG": str(log_dir),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def descendants(pid: int) -> list[int]:
    """The processes under `pid` (torchrun starts its workers in sessions of their own)."""
    children = defaultdict(list)
    for entry in os.listdir("/proc"):
        try:
            children[int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])].append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def lose(proc: subprocess.Popen) -> None:
    """A machine lost: the agent and every process under it SIGKILLed at once."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def entries(log_dir) -> list[dict]:
    found = []
    for path in log_dir.glob("rank*-*.jsonl"):
        pid = path.stem.split("-")[1]
        for line in path.read_text().splitlines():
            if line.endswith("}"):
                found.append({**json.loads(line), "pid": pid})
    return found


def wait_for(condition, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def kept(found: list[dict]) -> dict[int, list[int]]:
    """Per epoch, the image indices of the steps that count: a step repeated by a restart at the same world
    size is the same step (same slot, same images); a step of a group that a later group of another size
    rolled back (its slot at or past where the later group resumed the epoch, and before it) is dropped."""
    unique = {(e["epoch"], e["world"], e["rank"], e["slot"]): e for e in sorted(found, key=lambda e: e["time"])}
    steps = list(unique.values())
    firsts = {}  # (pid, epoch) -> (first slot, first time, world)
    for e in steps:
        key = (e["pid"], e["epoch"])
        if key not in firsts or e["time"] < firsts[key][1]:
            firsts[key] = (e["slot"], e["time"], e["world"])
    keep = [e for e in steps
            if not any(epoch == e["epoch"] and world != e["world"] and e["slot"] >= slot and e["time"] < t
                       for (_, epoch), (slot, t, world) in firsts.items())]
    per_epoch = defaultdict(list)
    for e in keep:
        per_epoch[e["epoch"]] += e["ids"]
    return per_epoch


def test_shrink_and_grow_use_every_image_once(tmp_path):
    data, out, log_dir = tmp_path / "data", tmp_path / "run", tmp_path / "samples"
    make_dataset(data, 3, TRAIN // 3, VAL // 3, seed=7, min_side=40, max_side=48, progress=False)
    log_dir.mkdir()
    port = free_port()
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in "abc"}
    a = agent(port, data, out, log_dir, logs["a"])
    # a binds the rendezvous port first: it hosts the store, so b is the one that can go (waited for, not slept
    # on: under load an agent takes seconds to start)
    wait_for(lambda: listening(port), 120, "agent a's rendezvous store", (a,))
    b = agent(port, data, out, log_dir, logs["b"])
    c = None
    try:
        # world 2, epoch 2 (index 1) under way: lose agent b and its worker at once
        wait_for(lambda: any(e["world"] == 2 and e["epoch"] == 1 and e["slot"] >= 8 for e in entries(log_dir)),
                 240, "two ranks in the second epoch", (a, b))
        lose(b)
        killed = time.monotonic()
        b.wait()
        wait_for(lambda: any(e["world"] == 1 for e in entries(log_dir)), 180, "training at world size 1", (a,))
        continued_s = time.monotonic() - killed
        c = agent(port, data, out, log_dir, logs["c"])  # joins: the group grows back to 2
        assert a.wait(timeout=300) == 0, (tmp_path / "a.log").read_text()[-3000:]
        assert c.wait(timeout=120) == 0, (tmp_path / "c.log").read_text()[-3000:]
    finally:
        for proc in (a, b, c):
            if proc is not None and proc.poll() is None:
                lose(proc)
        for file in logs.values():
            file.close()
    text = (tmp_path / "a.log").read_text()
    found = entries(log_dir)
    worlds = [e["world"] for e in sorted(found, key=lambda e: e["time"])]
    assert 1 in worlds and worlds[-1] == 2, f"worlds seen: {sorted(set(worlds))}"  # shrank, then grew back
    # the stop that a join sends may land mid-epoch ("; 8 of 48 images of the epoch done ...") or, when the
    # last step of the epoch was already under way, at the epoch's end ("step 0 of 6", no images part)
    resumes = re.findall(r"resumed at epoch (\d+), step (\d+) of \d+ \(resharded from (\d) process(?:es)?"
                         r"(?:; (\d+) of 48 images of the epoch done[^)]*)?\)", text)
    assert len(resumes) >= 2, text[-4000:]  # the shrink and the grow
    assert {world for _, _, world, _ in resumes} == {"1", "2"}, resumes  # from 2 processes, then from 1
    assert "the group changed membership" in text  # the grow: no fault
    for epoch, ids in sorted(kept(found).items()):
        assert len(ids) == len(set(ids)), f"epoch {epoch + 1}: an image used twice"
        assert set(ids) <= set(range(TRAIN))
        # a tail short of a global batch (4 at world 1 -> 2 with 4 images left over) may be dropped
        assert TRAIN - len(ids) in (0, BATCH), f"epoch {epoch + 1}: {len(ids)} of {TRAIN} images"
    assert sorted(kept(found)) == list(range(5))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validations = {r["epoch"]: r["val/count"] for r in records if "val/count" in r}
    assert validations == {e: VAL for e in range(1, 6)}, validations
    faults = [json.loads(line) for line in (out / "faults.jsonl").read_text().splitlines()]
    print(f"continued at world size 1 {continued_s:.1f} s after the loss; faults: {faults}; resumes: {resumes}")


def test_elastic_lr_keep_holds_the_peak_lr_the_run_trained_with(tmp_path):
    """--elastic-lr keep: a resume at another world size (here --reshard, outside torchrun) keeps the peak LR
    of the world size the checkpoint trained at; scale (the default) follows the new global batch."""
    import shutil

    import torch

    from rn50.reliability.checkpoint import load_checkpoint

    from conftest import run_cli, run_clis

    data = tmp_path / "data"
    make_dataset(data, 3, TRAIN // 3, VAL // 3, seed=7, min_side=40, max_side=48, progress=False)
    args = [sys.executable, "-m", "rn50.train", "--data", str(data), "--loader", "torchvision", "--workers", "0",
            "--arch", "resnet18", "--image-size", "32", "--batch-size", str(BATCH), "--epochs", "1", "--seed", "3"]
    # a checkpoint every 4 steps, all kept: the one after 4 steps is read (every step's would be 12 x 90 MB)
    first = run_cli([*args, "--out", str(tmp_path / "one"), "--checkpoint-every", "4", "--keep-checkpoints", "0"])
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoint = load_checkpoint(tmp_path / "one" / "checkpoint_0000_step00000004.pt")
    assert checkpoint["lr_world"] == 1
    # as if two processes had written it after 2 of their 6 steps: 16 of the 48 images done
    checkpoint.update(world_size=2, lr_world=2, steps_per_epoch=6, step=2, epoch_losses=[None, None],
                      loader=[{"epoch": 0, "position": 2}] * 2)
    torch.save(checkpoint, tmp_path / "two.pt")
    shutil.rmtree(tmp_path / "one")  # read: its 3 checkpoints need not sit beside the two runs below
    choices = (("keep", "0.003125"), ("scale", "0.001563"))
    runs = run_clis([[*args, "--out", str(tmp_path / choice), "--resume", str(tmp_path / "two.pt"), "--reshard",
                      "--elastic-lr", choice] for choice, _ in choices])  # side by side
    for (choice, peak), done in zip(choices, runs, strict=True):
        assert done.returncode == 0, done.stderr[-2000:]
        assert "16 of 48 images of the epoch done, the other 32 over 1 process: 8 steps" in done.stdout
        assert f"global batch 4, peak LR {peak}" in done.stdout, done.stdout[-1500:]
