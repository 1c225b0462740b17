"""tools.sweep: a base-LR x batch-size grid of real rn50.train runs on the generated data, one table
(sweep.md, sweep.json) and one plot, resuming, failed runs recorded, one-line user errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from rn50.config.errors import UserError
from tools.sweep import main
from tools.sweep_grid import parse_grid
from tools.sweep_launch import StderrRelay, error_line
from tools.sweep_results import best_per_batch

from conftest import ROOT, run_cli

# --keep-checkpoints 1: a run's newest checkpoint (and its best) is all a sweep resumes from; 90 MB each
TINY = ["--loader", "dali-cpu", "--arch", "resnet18", "--image-size", "32", "--dali-threads", "1",
        "--warmup-epochs", "1", "--lr-milestones", "2", "--keep-checkpoints", "1"]


def sweep(data_dir, out, lrs, batch_sizes, *extra):
    return run_cli([sys.executable, "-m", "tools.sweep", "--data", str(data_dir), "--out", str(out),
                    "--lrs", lrs, "--batch-sizes", batch_sizes, "--", *TINY, *extra])


def runs_by_name(out):
    return {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}


@pytest.mark.slow
def test_sweep_writes_one_table_and_one_plot_and_resumes(data_dir, tmp_path):
    out = tmp_path / "sweep"
    done = sweep(data_dir, out, "0.1,0.4", "16,32", "--epochs", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads((out / "sweep.json").read_text())
    runs = result["runs"]
    assert [r["name"] for r in runs] == ["lr0.1_bs16", "lr0.4_bs16", "lr0.1_bs32", "lr0.4_bs32"]
    for r in runs:
        assert r["status"] == "ok" and r["ran"] == "now" and r["error"] is None
        assert r["epochs_run"] == 2 and [e for e, _ in r["val_top1_by_epoch"]] == [1, 2]
        assert r["global_batch"] == r["batch_size"]
        # the linear scaling rule, as the run itself resolved it (recipe.json)
        assert r["peak_lr"] == pytest.approx(r["base_lr"] * r["batch_size"] / 256)
        assert r["final_val_top1"] == r["val_top1_by_epoch"][-1][1]
        assert r["best_val_top1"] == max(t for _, t in r["val_top1_by_epoch"])
        assert r["final_val_loss"] > 0 and r["img_per_s"] > 0 and r["wall_s"] > 0

    # best LR per batch size: highest best top-1, ties to the lower final val loss
    best = {b["batch_size"]: b for b in result["best_lr_per_batch"]}
    assert sorted(best) == [16, 32]
    for bs, entry in best.items():
        same = [r for r in runs if r["batch_size"] == bs]
        top = max(r["best_val_top1"] for r in same)
        tied = [r for r in same if r["best_val_top1"] == top]
        winner = min(tied, key=lambda r: r["final_val_loss"])
        assert (entry["run"], entry["base_lr"], entry["best_val_top1"]) == (winner["name"], winner["base_lr"], top)

    table = (out / "sweep.md").read_text()
    for r in runs:
        assert f"| {r['name']} | {r['base_lr']:g} | {r['batch_size']} |" in table
    for bs, entry in best.items():
        assert f"| {bs} | {entry['base_lr']:g} |" in table
    assert "Best base LR per batch size" in done.stdout and "lr0.4_bs32" in done.stdout  # printed too

    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1024

    # the same command again: every run is finished, nothing trains, the table is rewritten
    before = {r["name"]: (out / r["name"] / "metrics.jsonl").stat().st_mtime_ns for r in runs}
    again = sweep(data_dir, out, "0.1,0.4", "16,32", "--epochs", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped, finished earlier") == 4 and "training in" not in again.stdout
    assert {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in before} == before
    rerun = runs_by_name(out)
    assert all(r["status"] == "ok" and r["ran"] == "earlier" for r in rerun.values())
    assert {n: r["val_top1_by_epoch"] for n, r in rerun.items()} == {r["name"]: r["val_top1_by_epoch"] for r in runs}


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_sweep_goes_on(data_dir, tmp_path):
    out = tmp_path / "sweep"
    done = sweep(data_dir, out, "0.1", "1000,16", "--epochs", "1")  # 1000 > the 48 training images
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    runs = runs_by_name(out)
    failed, ok = runs["lr0.1_bs1000"], runs["lr0.1_bs16"]
    assert failed["status"] == "failed" and "exit code 2: error:" in failed["error"]
    assert "lower --batch-size" in failed["error"] and failed["val_top1_by_epoch"] == []
    assert ok["status"] == "ok" and ok["epochs_run"] == 1  # ran after the failure
    assert "failed: exit code 2" in (out / "sweep.md").read_text()
    best = {b["batch_size"]: b for b in json.loads((out / "sweep.json").read_text())["best_lr_per_batch"]}
    assert best[1000]["run"] is None and best[16]["run"] == "lr0.1_bs16"
    assert (out / "sweep.png").stat().st_size > 1024
    assert "1 of 2 runs failed: lr0.1_bs1000" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--lrs", ",", "--batch-sizes", "16"], "--lrs is empty"),
    (["--lrs", "0.1", "--batch-sizes", ""], "--batch-sizes is empty"),
    (["--lrs", "0.1,abc", "--batch-sizes", "16"], "'abc' is not a number"),
    (["--lrs", "0.1", "--batch-sizes", "16.5"], "'16.5' is not a whole number"),
    (["--lrs", "-0.1", "--batch-sizes", "16"], "must be a positive number"),
    (["--lrs", "0.1", "--batch-sizes", "16", "--nproc-per-node", "0"], "--nproc-per-node must be at least 1"),
    (["--lrs", "0.1", "--batch-sizes", "16", "--epochs", "2"], "flags for rn50.train go after `--`"),
    (["--lrs", "0.1", "--batch-sizes", "16", "--", "--batch-size", "8"], "set by the sweep (--batch-sizes)"),
    (["--lrs", "0.1", "--batch-sizes", "16", "--", "--base-lr=0.2"], "set by the sweep (--lrs)"),
    (["--lrs", "0.1", "--batch-sizes", "16", "--", "--epoch", "2"], "did you mean '--epochs'"),
    (["--lrs", "0.1", "--batch-sizes", "16", "--", "--epochs", "two"], "bad rn50.train flag after --"),
    # what would fail every run at start-up is caught once, before the first
    (["--lrs", "0.1", "--batch-sizes", "16", "--", "--arch", "resnet99"], "unknown arch 'resnet99'"),
    (["--lrs", "0.1", "--batch-sizes", "16", "--", "--schedule", "exponential"], "schedule must be one of"),
    (["--lrs", "0.1", "--batch-sizes", "16", "--", "--preset", "h100x9"], "no preset 'h100x9'"),
    (["--lrs", "0.1", "--batch-sizes", "16", "--", "--finetune-from", "/nowhere/w.pt"], "/nowhere/w.pt does not exist"),
    (["--lrs", "0.1", "--batch-sizes", "16", "--", "--weights", "NOPE"], "--weights NOPE is not a name of resnet50's"),
    (["--lrs", "0.1", "--batch-sizes", "16", "--", "--manifest", "/nowhere"], "manifest /nowhere/train.txt does not"),
    (["--lrs", "0.1", "--batch-sizes", "16", "--", "--device", "cpu", "--loader", "dali"], "pass --loader dali-cpu"),
])
def test_user_errors_are_one_line_and_exit_2(data_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        main(["--data", str(data_dir), "--out", str(tmp_path / "sweep"), *args])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "sweep").exists()  # nothing ran, nothing written


def test_bad_rn50_train_flag_reported_as_a_user_error_keeps_its_wording(data_dir, tmp_path, capsys, monkeypatch):
    """rn50.train's parser may report a bad value as a UserError (one line) instead of argparse's usage and
    SystemExit(2): the sweep says the same either way."""
    import rn50.train

    def refuse(argv=None):
        raise UserError("argument --epochs: invalid int value: 'two'")

    monkeypatch.setattr(rn50.train, "parse_args", refuse)
    with pytest.raises(SystemExit) as stop:
        main(["--data", str(data_dir), "--out", str(tmp_path / "sweep"), "--lrs", "0.1", "--batch-sizes", "16",
              "--", "--epochs", "two"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and lines == [
        "error: bad rn50.train flag after --: argument --epochs: invalid int value: 'two'"]
    assert not (tmp_path / "sweep").exists()


def test_each_grid_points_recipe_is_resolved_before_the_first_run(data_dir, tmp_path, capsys, monkeypatch):
    """A grid value the recipe refuses names its grid point, before anything runs (today the recipe refuses
    only batch sizes below 1, which --batch-sizes already rejects: a stricter recipe is simulated)."""
    import rn50.config.recipe

    resolve = rn50.config.recipe.resolve

    def strict(args, **layers):
        if getattr(args, "batch_size", None) == 64:
            raise UserError("batch_size 64 is refused by this recipe")
        return resolve(args, **layers)

    monkeypatch.setattr(rn50.config.recipe, "resolve", strict)
    with pytest.raises(SystemExit) as stop:
        main(["--data", str(data_dir), "--out", str(tmp_path / "sweep"), "--lrs", "0.1,0.2", "--batch-sizes", "16,64",
              "--", "--loader", "dali-cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and lines == ["error: grid point lr=0.1 bs=64: batch_size 64 is refused by this recipe"]
    assert not (tmp_path / "sweep").exists()


def _layout(root, train=("a", "b"), val=("a", "b"), empty=()):
    """A dataset folder of empty files named .JPEG (only listed, never decoded); None: no such split."""
    for split, classes in (("train", train), ("val", val)):
        if classes is None:
            continue
        (root / split).mkdir(parents=True)
        for name in classes:
            (root / split / name).mkdir()
            if f"{split}/{name}" not in empty:
                (root / split / name / "x.JPEG").write_bytes(b"")
    return root


@pytest.mark.parametrize("layout, message", [
    (dict(val=None), "val is missing; the data folder needs train/ and val/"),
    (dict(train=None), "train is missing; the data folder needs train/ and val/"),
    (dict(train=()), "has no class folders"),
    (dict(val=()), "holds no .JPEG files (nor .png, .bmp, .tif, .webp); put images in"),
    (dict(val=("a", "c")), "is a class that"),
    (dict(empty=("train/b",)), "train/b holds no .JPEG files"),
    (dict(empty=("val/a", "val/b")), "holds no .JPEG files (nor .png, .bmp, .tif, .webp); put images in"),
])
def test_a_data_folder_every_run_would_refuse_is_one_error_before_any_run(tmp_path, capsys, layout, message):
    data = _layout(tmp_path / "data", **layout)
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as stop:
        main(["--data", str(data), "--out", str(out), "--lrs", "0.1,0.2", "--batch-sizes", "16,32",
              "--", "--loader", "dali-cpu"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists() and "training in" not in captured.out  # nothing ran, no run folder


@pytest.mark.skipif(os.path.isdir("/proc/driver/nvidia/gpus") or shutil.which("nvidia-smi") is not None,
                    reason="asks for CUDA where there is none")
def test_a_presets_machine_device_is_checked_as_rn50_train_honours_it(data_dir, tmp_path, capsys):
    """Each run's device comes from its resolved machine settings, a preset's [machine] table included
    (test_errors.py::test_a_presets_machine_device_is_honoured): the sweep's check resolves it the same way, so
    `device = "cuda"` on a machine without CUDA is one line before any run, not one failure per grid point."""
    preset = tmp_path / "gpu.toml"
    preset.write_text('[machine]\ndevice = "cuda"\n')
    with pytest.raises(SystemExit) as stop:
        main(["--data", str(data_dir), "--out", str(tmp_path / "sweep"), "--lrs", "0.1,0.2", "--batch-sizes", "16",
              "--", "--preset", str(preset)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "no NVIDIA GPU" in lines[0], lines
    assert not (tmp_path / "sweep").exists()


def test_a_shard_folder_is_checked_as_rn50_train_lists_it(data_dir, tmp_path, capsys):
    """--data may name a tools.shard folder, as rn50.train's may: the check lists it with the one listing
    (pipelines.list_data). It listed class folders only, so a sweep over shards stopped at 'train is missing'
    before any run; now the check goes on to the grid's recipes (here refusing an unknown arch)."""
    from tools import shard

    shard.main([str(data_dir), "--out", str(tmp_path / "shards"), "--quiet"])
    with pytest.raises(SystemExit) as stop:
        main(["--data", str(tmp_path / "shards"), "--out", str(tmp_path / "sweep"), "--lrs", "0.1",
              "--batch-sizes", "16", "--", "--arch", "resnet99"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "unknown arch 'resnet99'" in lines[0], lines
    with pytest.raises(SystemExit) as stop:  # a manifest lists class folders' files: refused as rn50.train does
        main(["--data", str(tmp_path / "shards"), "--out", str(tmp_path / "sweep"), "--lrs", "0.1",
              "--batch-sizes", "16", "--", "--manifest", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "--manifest lists files of class folders" in lines[0], lines
    assert not (tmp_path / "sweep").exists()


def test_missing_data_is_a_user_error(tmp_path, capsys):
    for argv, message in [(["--out", str(tmp_path), "--lrs", "0.1", "--batch-sizes", "16"], "--data"),
                          (["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s"), "--lrs", "0.1",
                            "--batch-sizes", "16"], "is not a folder")]:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_grid_order_names_and_duplicates():
    grid = parse_grid("0.05, 0.1,0.10,1e-1", "32,64")
    assert [p.name for p in grid] == ["lr0.05_bs32", "lr0.1_bs32", "lr0.05_bs64", "lr0.1_bs64"]
    assert grid[0].label == "lr=0.05 bs=32"


def test_best_lr_breaks_ties_by_final_val_loss_then_lower_lr():
    def row(lr, bs, best, loss, status="ok"):
        return {"name": f"lr{lr:g}_bs{bs}", "base_lr": lr, "batch_size": bs, "peak_lr": lr * bs / 256,
                "best_val_top1": best, "final_val_loss": loss, "status": status}

    rows = [row(0.1, 32, 75.0, 0.9), row(0.2, 32, 75.0, 0.7), row(0.4, 32, 70.0, 0.5),
            row(0.1, 64, 50.0, 1.0), row(0.2, 64, 50.0, 1.0), row(0.4, 64, 90.0, 0.1, status="failed")]
    best = {b["batch_size"]: b for b in best_per_batch(rows)}
    assert best[32]["base_lr"] == 0.2  # tie on top-1, lower final loss wins
    assert best[64]["base_lr"] == 0.1  # full tie: the lower LR; the failed run never counts


def test_error_line_skips_the_torchrun_banner():
    lines = ["error: batch size 1000 is larger than ...; lower --batch-size",
             "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ", "=" * 60,
             "rn50.train FAILED", "  exitcode  : 2 (pid: 1)", "=" * 60]
    assert error_line(lines, 1) == "exit code 1: error: batch size 1000 is larger than ...; lower --batch-size"
    assert error_line(["Traceback ...", "RuntimeError: boom", ""], 1) == "exit code 1: RuntimeError: boom"
    assert error_line([], -9) == "killed by signal 9"


# the end of a run stopped by SIGTERM under torchrun (torch 2.14), as the sweep reads it on the run's stderr
TORCHRUN_STOPPED = """\
W1125 03:19:01.421000 1470 torch/distributed/elastic/agent/server/api.py:753] Received 15 death signal, shutting down workers
stopped by SIGTERM: checkpoint saved to /runs/lr0.1_bs8/checkpoint_0000_step00000002.pt; exit code 75. Run the same command with --resume auto to continue
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "torch/distributed/run.py", line 1138, in main
    run(args)
  File "torch/distributed/elastic/multiprocessing/api.py", line 86, in _terminate_process_handler
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 1470 got signal: 15
"""


def relayed(text):
    relay = StderrRelay()
    out = [piece for line in text.splitlines(keepends=True) for piece in relay.feed(line)]
    return "".join(out + relay.close())


def test_the_runs_resume_advice_is_not_relayed_as_the_sweeps():
    """rn50.train's advice (--resume auto) is refused by the sweep after `--`: the sweep rewrites it, and
    summarises torchrun's SignalException traceback (its report of the signal, not a crash)."""
    out = relayed(TORCHRUN_STOPPED).splitlines()
    assert out == [
        TORCHRUN_STOPPED.splitlines()[0],  # torchrun's own log line passes unchanged
        "stopped by SIGTERM: the run saved a checkpoint; the sweep continues it when run again",
        "torchrun: stopped by signal 15 (the traceback it prints then is its report of the signal, not a crash; "
        "left out here)",
    ]
    assert "--resume" not in "\n".join(out) and "Traceback" not in "\n".join(out)
    assert error_line(out, 1) == ("exit code 1: stopped by SIGTERM: the run saved a checkpoint; the sweep continues "
                                  "it when run again")
    usr1 = relayed("stopped by SIGUSR1: checkpoint saved; run the same command with --resume auto to continue\n")
    assert usr1 == "stopped by SIGUSR1: the run saved a checkpoint; the sweep continues it when run again\n"


def test_other_lines_and_tracebacks_pass_unchanged():
    crash = ("epoch 1 step 2/3\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n\n"
             "    boom()\nRuntimeError: boom\nerror: something; fix it\nstopped by SIGTERM: not the advice line\n")
    assert relayed(crash) == crash
    cut_short = "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
    assert relayed(cut_short) == cut_short  # held until the end of the stream, then written whole


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_stops_the_sweep_with_true_advice_and_the_same_command_continues(data_dir, tmp_path, nproc):
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "tools.sweep", "--data", str(data_dir), "--out", str(out), "--lrs", "0.1",
               "--batch-sizes", "8,16", "--nproc-per-node", str(nproc), "--", *TINY, "--epochs", "3",
               "--checkpoint-every", "2", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "lr0.1_bs8"
    deadline = time.time() + 300
    while not list(first.glob("checkpoint_*.pt")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 75, stdout[-3000:] + stderr[-3000:]
    assert "stopped by SIGTERM: the run saved a checkpoint; the sweep continues it when run again" in stderr
    assert "--resume auto" not in stderr  # the sweep refuses --resume after --: no advice to use it
    assert stderr.strip().splitlines()[-1] == "sweep stopped (SIGTERM); run the same command to continue it"
    if nproc > 1:  # torchrun's SignalException traceback is summarised, not relayed as a crash
        assert "Traceback" not in stderr and "torchrun: stopped by signal 15" in stderr
    runs = runs_by_name(out)
    assert runs["lr0.1_bs8"]["status"] == "interrupted" and "the sweep continues it" in runs["lr0.1_bs8"]["error"]
    assert runs["lr0.1_bs16"]["status"] == "not run"

    again = run_cli(command)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[1/2] lr=0.1 bs=8: resuming the unfinished run" in again.stdout
    runs = runs_by_name(out)
    assert all(r["status"] == "ok" and r["epochs_run"] == 3 for r in runs.values())
