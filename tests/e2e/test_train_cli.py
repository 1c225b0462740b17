"""rn50.train end to end on the generated data: real DDP over gloo through torchrun, exact validation
counts, falling loss, identical replicas, resume, and one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from rn50.train import main

from conftest import N_VAL_IMAGES, run_cli, run_clis

SMALL = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--dali-threads", "1",
         "--warmup-epochs", "1", "--lr-milestones", "2", "--log-every", "3"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epoch_records(run_dir):
    return [r for r in read_metrics(run_dir) if "val/count" in r]


@pytest.mark.slow
def test_two_process_gloo_ddp_run(shared_ddp_run):
    out, done = shared_ddp_run.dir, shared_ddp_run.done  # torchrun, 2 ranks, 2 epochs, base LR 0.4
    epochs = epoch_records(out)
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(r["val/count"] == N_VAL_IMAGES for r in epochs)  # 44 over 2 ranks, each image once
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 16
    assert summary["ddp/replicas_identical"] is True
    assert summary["final"]["val/count"] == N_VAL_IMAGES
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["peak_lr"] == pytest.approx(0.4 * 16 / 256) and recipe["optimisation"]["batch_size"] == 8
    machine = json.loads((out / "machine.json").read_text())
    assert machine["loader"] == "dali-cpu" and "loader" not in json.dumps(recipe)
    # 3 steps per epoch, a checkpoint every 2 steps, --keep-checkpoints 4: every one kept (the names as the run
    # left them: conftest's finished_shared_run deletes the mid-epoch ones afterwards), and the best
    assert list(shared_ddp_run.checkpoints) == [
        "checkpoint_0000_step00000002.pt", "checkpoint_0001.pt", "checkpoint_0001_step00000004.pt",
        "checkpoint_0002.pt", "checkpoint_best.pt"]
    assert "top-1" in done.stdout and "img/s" in done.stdout


def test_resume_continues_the_schedule_bit_for_bit(shared_run, tmp_path):
    """The shared 2-epoch run is the straight one; a resume from its epoch-1 checkpoint (a path, not auto)
    must give the same epoch 2 and the same final weights."""
    straight, resumed = shared_run.dir, tmp_path / "resumed"
    done = run_cli([*shared_run.args, "--out", str(resumed), "--resume", str(straight / "checkpoint_0001.pt"),
                    "--keep-checkpoints", "1"])  # the final checkpoint is read, not the 3 before it
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [r["epoch"] for r in epoch_records(resumed)] == [2]
    for a, b in zip(epoch_records(straight)[1:], epoch_records(resumed), strict=True):
        assert (a["step"], a["lr"], a["train/loss"], a["val/top1"]) == (b["step"], b["lr"], b["train/loss"], b["val/top1"])
    final_a = torch.load(straight / "checkpoint_0002.pt")["model"]
    final_b = torch.load(resumed / "checkpoint_0002.pt")["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_user_errors_are_one_line_and_exit_2(data_dir, tmp_path):
    cases = [
        (["--data", str(tmp_path / "nowhere"), "--loader", "dali-cpu"], "does not exist"),
        (["--data", str(data_dir), "--batchsize", "8"], "did you mean '--batch-size'"),
        (["--data", str(data_dir), "--loader", "dali"], "CUDA is not available"),
        (["--data", str(data_dir), "--loader", "dali-cpu", "--resume", str(tmp_path / "none.pt")], "does not exist"),
        (["--data", str(data_dir), "--loader", "dali-cpu", "--batch-size", "4096"], "lower --batch-size"),
    ]
    if torch.cuda.is_available():
        cases.pop(2)
    # side by side (conftest's run_clis), each with a run folder of its own
    results = run_clis([[sys.executable, "-m", "rn50.train", "--out", str(tmp_path / f"run{i}"), *args]
                        for i, (args, _) in enumerate(cases)])
    for (args, message), done in zip(cases, results, strict=True):
        assert done.returncode == 2, (args, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
        assert "Traceback" not in done.stderr


def test_unknown_choices_are_user_errors(data_dir, tmp_path):
    """(moved from tests/component/test_advanced_recipes.py: it starts the command)"""
    done = run_cli([sys.executable, "-m", "rn50.train", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                    "--loader", "dali-cpu", *SMALL, "--optimizer", "adam"])
    assert done.returncode == 2 and "optimizer must be one of sgd, adamw, lamb" in done.stderr


def test_start_up_says_what_differs_from_the_defaults_and_synthetic_validation_is_not_learning(
        data_dir, tmp_path, capsys):
    """A short summary instead of the whole recipe; on synthetic data, validation sees other random images
    and labels than training, so memorising the training batch does not look like learning."""
    out = tmp_path / "run"
    main(["--data", str(data_dir), "--out", str(out), "--loader", "synthetic", "--epochs", "3", "--base-lr", "2",
          *SMALL, "--keep-checkpoints", "1"])  # no checkpoint is read (90 MB each)
    stdout = capsys.readouterr().out
    summary_line = next(line for line in stdout.splitlines() if line.startswith("recipe: "))
    assert 'arch="resnet18"' in summary_line and "image_size=32" in summary_line and "epochs=3" in summary_line
    assert "label_smoothing" not in stdout  # fields left at their defaults are not listed
    assert "synthetic data: validation runs on other random images" in stdout
    records = epoch_records(out)
    assert records[-1]["train/loss"] < records[0]["train/loss"]  # the training batch is being learned
    assert records[-1]["val/top1"] < 75  # the old behaviour: validation on the training batch, near 100%


def test_synthetic_validation_batch_is_not_the_training_batch(tmp_path):
    from pipelines import build_loader

    def first(split):
        loader = build_loader("synthetic", split, None, batch_size=16, image_size=32, rank=0, world_size=1, seed=0,
                              device=torch.device("cpu"), num_samples=64, num_classes=10)
        return next(iter(loader))

    (train_images, train_labels), (val_images, val_labels) = first("train"), first("val")
    assert not torch.equal(train_images, val_images) and not torch.equal(train_labels, val_labels)


def test_a_finished_run_is_one_whose_epochs_are_done_or_whose_unchanged_rules_stopped_it(tmp_path):
    from rn50.config.recipe import with_fields
    from rn50.reliability.lifecycle import finished

    (tmp_path / "summary.json").write_text("{}")
    recipe = with_fields(epochs=4, early_stop_patience=2)
    done = {"epoch": 4, "history": [{"epoch": 4}]}
    stopped = {"epoch": 2, "history": [{"epoch": 1}, {"epoch": 2, "stop": "no better val/top1 for 2 epochs"}]}
    running = {"epoch": 2, "history": [{"epoch": 1}, {"epoch": 2}]}
    assert finished(done, recipe, recipe, tmp_path)
    assert finished(stopped, recipe, recipe, tmp_path)
    assert not finished(running, recipe, recipe, tmp_path)
    assert not finished(done, recipe, with_fields(recipe, epochs=6), tmp_path)  # asked to train longer
    assert not finished(stopped, recipe, with_fields(recipe, early_stop_patience=5), tmp_path)  # new rules
    (tmp_path / "summary.json").unlink()
    assert not finished(done, recipe, recipe, tmp_path)  # killed before its summary: finish it


def test_loader_auto_and_the_progress_a_scaled_down_recipe_prints(data_dir, tmp_path, capsys, monkeypatch):
    """Issue 23, 3.5, 3.8 and 3.9, on one short run: no --loader is `auto` (dali-cpu here, said at start-up
    and saved as dali-cpu); a warm-up longer than the run is a warning and the summary reports the peak LR
    reached; the epoch where progressive resizing changes the size says so, in the console's epoch numbers;
    an epoch shorter than --log-every still prints its step line."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    out = tmp_path / "run"
    main(["--data", str(data_dir), "--out", str(out), "--arch", "resnet18", "--batch-size", "8", "--dali-threads", "1",
          "--epochs", "2", "--warmup-epochs", "5", "--lr-milestones", "1", "--image-size", "32", "--max-res", "64",
          "--start-ramp", "0", "--end-ramp", "1", "--log-every", "50"])
    stdout = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "loader auto: dali-cpu" in stdout
        assert json.loads((out / "machine.json").read_text())["loader"] == "dali-cpu"
    assert "progressive resizing: 32 px in epoch 1, 64 px in epoch 2" in stdout
    assert "epoch 2: training at 64 px from now on (progressive resizing, 32 px until now)" in stdout
    assert [r["train/resolution"] for r in epoch_records(out)] == [32, 64]
    assert "warning: the warm-up (5 epochs) outlasts this run's 2 epochs" in stdout
    spe = 48 // 8
    assert [line.split(" lr ")[0] for line in stdout.splitlines() if " lr " in line] == [
        f"epoch 1 step {spe}/{spe}", f"epoch 2 step {spe}/{spe}"]
    summary = json.loads((out / "summary.json").read_text())
    last_step = 2 * spe - 1  # the warm-up's ramp stops at the run's last step: peak x (last_step / 5 epochs)
    assert summary["peak_lr_reached"] == pytest.approx(summary["peak_lr"] * last_step / (5 * spe))
    assert "reached only" in stdout


# Runs a command's module as `python -m` does, then says whether torch, DALI or torchvision were imported
RUN_AND_REPORT_IMPORTS = """
import runpy, sys
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    print("heavy:", [m for m in ("torch", "nvidia.dali", "torchvision") if m in sys.modules], flush=True)
"""


@pytest.mark.parametrize("module", ["rn50.train", "rn50.evaluate", "benchmarks.run"])
def test_a_bad_flag_exits_2_before_torch_or_dali_is_imported(module, tmp_path):
    """Issue 23, 3.10 and 5.4: a mistyped flag took ~7 s (torch and DALI imported first) to be reported."""
    out = tmp_path / "new" / "out"
    extra = ["--weights", str(tmp_path / "w.pt")] if module == "rn50.evaluate" else []
    done = run_cli([sys.executable, "-c", RUN_AND_REPORT_IMPORTS, module, "--data", str(tmp_path), "--out", str(out),
                    *extra, "--learning-rate", "0.1"])
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip() == "heavy: []", done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown argument '--learning-rate'"), done.stderr
    if module != "rn50.evaluate":  # evaluate takes no --base-lr: the closest spelling there
        assert "did you mean '--base-lr'?" in lines[0]
    assert not (tmp_path / "new").exists()


def test_a_failed_start_leaves_no_run_folder_that_did_not_exist_before(data_dir, tmp_path):
    """Issue 23, 3.10: the run folder (and its new parents) was made before the data and the batch were
    checked, and stayed behind empty when they failed; a folder that existed stays, as it was."""
    out = tmp_path / "new" / "run"
    (tmp_path / "kept").mkdir()
    done, again = run_clis([
        [sys.executable, "-m", "rn50.train", "--data", str(data_dir), "--out", str(out), "--loader", "dali-cpu",
         "--batch-size", "4096"],
        [sys.executable, "-m", "rn50.train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "kept"),
         "--loader", "dali-cpu"]])
    assert done.returncode == 2 and "lower --batch-size" in done.stderr, done.stderr
    assert not (tmp_path / "new").exists()
    assert again.returncode == 2 and "does not exist" in again.stderr, again.stderr
    assert (tmp_path / "kept").is_dir()
