"""Surviving preemption, crashes and divergence: exact mid-epoch resume after SIGTERM, checkpoint
retention, --resume auto, world-size checks and the divergence guard."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from rn50.reliability.checkpoint import BEST, load_checkpoint, regular_checkpoints
from rn50.reliability.exits import EXIT_PREEMPTED
from rn50.reliability.exits import EXIT_DIVERGED

from conftest import ROOT, run_cli, run_clis

SMALL = ["--loader", "dali-cpu", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
         "--dali-threads", "1", "--warmup-epochs", "1", "--lr-milestones", "2", "--seed", "3", "--log-every", "1"]


def step_losses(run_dir):
    """train/loss of every logged step; a resumed run's later lines win (they are the ones kept)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val/count" not in record:
            losses[record["step"]] = record["train/loss"]
    return losses


def epoch_losses(run_dir):
    """train/loss of every epoch-end record: the mean over the whole epoch, resumed or not."""
    return {r["epoch"]: r["train/loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "val/count" in r}


def final_weights(run_dir):
    return load_checkpoint(regular_checkpoints(run_dir)[-1])["model"]


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def kill_when_checkpointed(command, run_dir, signum=signal.SIGTERM, **env):
    """Start a run, send `signum` once its first checkpoint exists, return its exit code."""
    process = subprocess.Popen(command, cwd=ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1", **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list(run_dir.glob("checkpoint_*.pt")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])  # SIGUSR1: what SLURM sends first
def test_stop_signal_mid_epoch_then_resume_matches_an_uninterrupted_run(shared_run, tmp_path, signum):
    # the uninterrupted run is the shared one (2 epochs, a checkpoint every 2 steps); keeping 1 checkpoint of 90 MB
    # instead of its 4 changes no step (a run setting, not the recipe)
    args = [*shared_run.args, "--keep-checkpoints", "1"]
    code, output = kill_when_checkpointed([*args, "--out", str(tmp_path / "b")], tmp_path / "b", signum)
    assert code == EXIT_PREEMPTED, output[-2000:]
    assert f"stopped by {signal.Signals(signum).name}" in output
    interrupted_at = max(step_losses(tmp_path / "b"))
    assert interrupted_at < 12  # it really stopped early (2 epochs x 6 steps)

    resumed = run_cli([*args, "--out", str(tmp_path / "b"), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "--resume auto: continuing from" in resumed.stdout
    assert step_losses(shared_run.dir) == step_losses(tmp_path / "b")  # every step, bit for bit
    # the interrupted epoch's mean covers the steps before the stop too (their sums came with the checkpoint)
    assert epoch_losses(shared_run.dir) == epoch_losses(tmp_path / "b")
    assert same_weights(final_weights(shared_run.dir), final_weights(tmp_path / "b"))


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_and_resumes_two_ranks_exactly(shared_ddp_run, tmp_path):
    # the uninterrupted run is the shared two-rank one (a checkpoint every 2 steps); 1 checkpoint kept, not 4
    args = [*shared_ddp_run.args, "--keep-checkpoints", "1"]
    code, output = kill_when_checkpointed([*args, "--out", str(tmp_path / "b")], tmp_path / "b")
    assert code != 0 and "stopped by SIGTERM" in output, output[-3000:]
    resumed = run_cli([*args, "--out", str(tmp_path / "b"), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert step_losses(shared_ddp_run.dir) == step_losses(tmp_path / "b")
    assert epoch_losses(shared_ddp_run.dir) == epoch_losses(tmp_path / "b")
    assert same_weights(final_weights(shared_ddp_run.dir), final_weights(tmp_path / "b"))


def test_keeps_the_last_k_and_the_best(shared_run):
    out = shared_run.dir  # --checkpoint-every 2 --keep-checkpoints 4 (not the default 3): 6 saved, the last 4 kept
    names = [n for n in shared_run.checkpoints if n != BEST]  # as the run left them (conftest: finished_shared_run)
    assert names == ["checkpoint_0001.pt", "checkpoint_0001_step00000008.pt", "checkpoint_0001_step00000010.pt",
                     "checkpoint_0002.pt"]
    top1 = [r["val/top1"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val/top1" in r]
    best = load_checkpoint(out / BEST)
    latest_best_epoch = len(top1) - top1[::-1].index(max(top1))  # ties: the later epoch is kept
    assert best["epoch"] == latest_best_epoch and best["history"][-1]["val/top1"] == max(top1)
    assert not list(out.glob(".*tmp"))  # no temporary files left


def test_resume_auto_on_a_finished_run_says_so_and_leaves_it_alone(shared_run, tmp_path):
    out = shared_run.copy_to(tmp_path / "run")
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    stale = out / ".checkpoint_0001_step00000099.pt.abc123.tmp"  # a killed checkpoint write: no part of the run
    stale.write_bytes(b"partial")
    again = run_cli([*shared_run.args, "--out", str(out), "--resume", "auto"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "holds a finished run" in again.stdout and "resumed at" not in again.stdout, again.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()} == files
    assert not stale.exists()


def test_resume_auto_without_a_checkpoint_starts_fresh(shared_run):
    done = shared_run.done  # the shared run was started with --resume auto on an empty folder
    assert done.returncode == 0 and "no checkpoint" in done.stdout


def test_world_size_change_needs_reshard(shared_run, tmp_path):
    checkpoint = load_checkpoint(shared_run.dir / "checkpoint_0001.pt")
    checkpoint["world_size"] = 2  # as if two processes had written it
    torch.save(checkpoint, tmp_path / "two.pt")
    args = [*shared_run.args, "--resume", str(tmp_path / "two.pt")]
    refused, resharded = run_clis([[*args, "--out", str(tmp_path / "again")],  # side by side
                                   [*args, "--out", str(tmp_path / "again2"), "--reshard", "--keep-checkpoints", "1"]])
    assert refused.returncode == 2 and "written by 2 processes" in refused.stderr and "--reshard" in refused.stderr
    assert resharded.returncode == 0, resharded.stderr[-2000:]
    assert "resharded from 2 processes" in resharded.stdout


def test_divergence_stops_and_keeps_only_good_checkpoints(data_dir, tmp_path):
    out = tmp_path / "run"
    done = run_cli([sys.executable, "-m", "rn50.train", "--data", str(data_dir), "--out", str(out), "--epochs", "2",
                    *SMALL, "--warmup-epochs", "0", "--base-lr", "1e12", "--checkpoint-every", "1",
                    "--max-nonfinite-steps", "3"])
    assert done.returncode == EXIT_DIVERGED, done.stderr[-2000:]
    assert "NaN or inf for 3 steps in a row" in done.stderr and "Traceback" not in done.stderr
    kept = regular_checkpoints(out)
    assert kept, "the good checkpoints before the divergence are kept"
    for path in kept:
        assert all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values() if t.is_floating_point())


def test_bad_file_stops_before_training_and_the_scan_manifest_trains(data_dir, tmp_path):
    import shutil

    from pipelines.folder import list_split
    from tools.scan import scan

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    good = list_split(str(data), "train").files[0]
    bad = data / "train" / "n00000001" / "broken.JPEG"
    bad.write_bytes(open(good, "rb").read()[:600])  # truncated mid-scan
    args = [sys.executable, "-m", "rn50.train", "--data", str(data), "--epochs", "1", *SMALL]
    refused = run_cli([*args, "--out", str(tmp_path / "refused")])
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert str(bad) in refused.stderr and "python -m tools.scan" in refused.stderr and "--manifest" in refused.stderr
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()  # stopped before training

    report = scan(data, tmp_path / "scan", workers=1, progress=False)
    assert [b["path"] for b in report["splits"]["train"]["bad"]] == ["n00000001/broken.JPEG"]
    trained = run_cli([*args, "--out", str(tmp_path / "run"), "--manifest", str(tmp_path / "scan")])
    assert trained.returncode == 0, trained.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"]["train_images"] == 48  # the good files only
    assert summary["final"]["val/count"] == 44
