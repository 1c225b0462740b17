"""Issue 38, items 1-3, as users meet them with `python -m rn50.train`: the documented lower-LR resume after a
divergence (and a finished run made longer with it), Ctrl-C (a checkpoint, one line, exit 130, and the same
command naming --resume auto), and a run whose only checkpoint is unreadable (one line, exit 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rn50.config.recipe import resolve
from rn50.core.schedule import lr_at
from rn50.reliability.checkpoint import load_checkpoint, regular_checkpoints
from rn50.reliability.exits import EXIT_INTERRUPTED

from conftest import ROOT, run_cli, run_clis

TINY = ["--loader", "dali-cpu", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--dali-threads", "1",
        "--seed", "3"]


def step_lrs(run_dir, epoch: int) -> dict[int, float]:
    """The LR logged at each step of epoch `epoch` (1-based), the later line of a step winning."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["lr"] for r in records if "val/count" not in r and epoch - 1 < r["epoch"] <= epoch}


@pytest.mark.slow  # two training runs side by side, about 20 s on 2 cores
def test_a_lower_lr_resume_runs_as_documented_and_extends_a_finished_run(shared_run, tmp_path):
    """38.1: `--resume CKPT --base-lr 0.05` (docs/reliability.md, after a divergence) exited 2 asking for
    --allow-change base_lr, and so did a finished run made longer with a lower LR (`--epochs 3 --resume auto
    --base-lr 0.05`). Both run now, say the change in one line, and the coming steps take the new LR."""
    fixed, longer = shared_run.copy_to(tmp_path / "fixed"), shared_run.copy_to(tmp_path / "longer")
    done = run_clis([[*shared_run.args, "--out", str(fixed), "--resume", str(fixed / "checkpoint_0001.pt"),
                      "--base-lr", "0.05"],
                     [*shared_run.args, "--out", str(longer), "--epochs", "3", "--resume", "auto",
                      "--base-lr", "0.05"]])
    for run, (out, epoch, epochs) in zip(done, ((fixed, 2, 2), (longer, 3, 3))):
        assert run.returncode == 0, run.stderr[-2000:]
        change = "base_lr 0.1 -> 0.05" + (", epochs 2 -> 3" if epochs == 3 else "")
        assert f"changed on resume: {change} (the LR of the steps to come" in run.stdout, run.stdout
        assert "Traceback" not in run.stderr and "--allow-change" not in run.stdout + run.stderr
        recipe = resolve(saved=load_checkpoint(regular_checkpoints(out)[-1])["recipe"]).recipe
        assert recipe.optimisation.base_lr == 0.05 and recipe.schedule.epochs == epochs
        peak = recipe.optimisation.peak_lr(1)
        lrs = step_lrs(out, epoch)
        assert len(lrs) == 6 and all(lr == lr_at(recipe.schedule, peak, step - 1, 6) for step, lr in lrs.items())
        assert json.loads((out / "summary.json").read_text())["epochs_run"] == epochs


@pytest.mark.slow  # a run stopped by Ctrl-C, then two commands side by side, about 20 s on 2 cores
def test_ctrl_c_saves_a_checkpoint_in_one_line_and_the_same_command_names_resume_auto(data_dir, tmp_path):
    """38.2: Ctrl-C printed a KeyboardInterrupt traceback, exited 130 and saved nothing; the same command then
    said "already holds a run". Now Ctrl-C (SIGINT to the whole process group, as a terminal sends it) saves a
    checkpoint at the next step and ends with one line and exit 130; the same command names --resume auto in one
    line; and --resume auto continues at the checkpoint's step (with a schedule change: the resume stays exact)."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "rn50.train", "--data", str(data_dir), "--out", str(out), *TINY, "--epochs", "50",
               "--checkpoint-every", "1"]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not list(out.glob("checkpoint_*.pt")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == EXIT_INTERRUPTED == 130, stderr[-3000:]
    assert "Traceback" not in stderr + stdout and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped by SIGINT: checkpoint saved to {out}/checkpoint_0000_step"), stderr
    assert last.endswith("; exit code 130. Run the same command with --resume auto to continue")
    saved = out / last.split("checkpoint saved to ")[1].split(";")[0].rsplit("/", 1)[1]
    assert saved == regular_checkpoints(out)[-1] and load_checkpoint(saved)["step"] >= 1  # whole, and verified

    again, resumed = run_clis([command, [*command[:-4], "--epochs", "1", "--resume", "auto"]])
    assert again.returncode == 2 and again.stdout == "", again.stderr
    assert again.stderr.strip() == (f"error: {out} already holds an unfinished run (its newest checkpoint: "
                                    f"{saved.name}); to continue it, run the same command with --resume auto; to "
                                    "start a new run, pass a new --out")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    step = load_checkpoint(saved)["step"]
    assert f"resumed at epoch 1, step {step} of 6" in resumed.stdout, resumed.stdout


def test_an_unreadable_only_checkpoint_is_one_line_whatever_the_flags(shared_run, data_dir, tmp_path):
    """38.3: with the only checkpoint truncated, the short resume (`--data D --out R --resume auto`) said "batch
    size 256 is larger than this rank's share" (the defaults, since the checkpoint's recipe could not be read),
    and with the run's flags it said "skipping ... truncated" and "no checkpoint", then trained afresh in the
    run's folder. Both now stop with one line naming the file, the integrity check's verdict and the way out."""
    out = shared_run.copy_to(tmp_path / "run")
    for path in [*regular_checkpoints(out)[1:], out / "checkpoint_best.pt"]:
        path.unlink()
        path.with_suffix(".sha256").unlink()
    only = regular_checkpoints(out)[0]
    head = only.read_bytes()[:1000]
    only.unlink()  # a hard link to the shared run's file: a new file, never a write into it
    only.write_bytes(head)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    short, full = run_clis([[sys.executable, "-m", "rn50.train", "--data", str(data_dir), "--out", str(out),
                             "--resume", "auto"], [*shared_run.args, "--out", str(out), "--resume", "auto"]])
    for run in (short, full):
        assert run.returncode == 2 and run.stdout == "", run.stdout + run.stderr
        line = run.stderr.strip()
        assert "\n" not in line and line.startswith(f"error: --resume auto: the only checkpoint of {out}, "
                                                    f"{only.name}, is unreadable: truncated: 1000 bytes of the ")
        assert line.endswith(f"(the integrity check against {only.stem}.sha256); restore that file (from a copy), "
                             "or start afresh with a new --out")
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written, nothing removed
