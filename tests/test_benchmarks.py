"""The benchmark harness: MFU arithmetic, stall against a loader that sleeps a known time, the verdict
logic, and the report schema from a real (tiny) run."""

from __future__ import annotations

import json
import time

import pytest
import torch

from benchmarks.flops import flops_per_image, mfu, peak_tflops
from benchmarks.recommend import ratios_to_dali, recommend
from benchmarks.run import Bench, Plan, main, time_to_train
from benchmarks.stall import percentile
from benchmarks.verdict import verdict
from rn50.dist import DistEnv
from rn50.recipe import with_fields

from conftest import N_TRAIN_IMAGES


def test_flops_per_image_counted_on_the_real_model():
    assert flops_per_image("resnet50", 224) == pytest.approx(24.3e9, rel=0.01)  # forward + backward
    assert flops_per_image("resnet50", 224, training=False) == pytest.approx(8.18e9, rel=0.01)
    # convolutions scale with the pixel count: 448 px is four times the work (the fc layer aside)
    assert flops_per_image("resnet50", 448) == pytest.approx(4 * 24.3e9, rel=0.01)


def test_mfu_arithmetic():
    # Hand-computed, not the formula restated: a wrong formula (a missing 1e12, FLOPs per step instead of
    # per image, the peak in the numerator) gives other numbers.
    # 10,000 img/s x 10 GFLOP/img = 100 TFLOP/s achieved, of a 400 TFLOP/s peak: exactly 0.25
    assert mfu(10_000, 10e9, 400.0) == pytest.approx(0.25, rel=1e-9)
    # 4,912 img/s x 24.30 GFLOP = 119.36 TFLOP/s, on an H100 (989 TFLOP/s): 119.36 / 989 = 0.1207
    assert mfu(4912, 24.3e9, 989.0) == pytest.approx(0.1207, abs=1e-4)
    # 1,000 img/s x 8.18 GFLOP (forward only) = 8.18 TFLOP/s, on an A100 (312 TFLOP/s): 0.02622
    assert mfu(1000, 8.18e9, 312.0) == pytest.approx(0.02622, abs=1e-5)
    assert mfu(1000, 24.3e9, None) is None  # unknown peak: no figure, no guess


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10", 125.0), ("NVIDIA GeForce RTX 3090", 71.0),
    ("Tesla T4", None), (None, None),
])
def test_peak_table_lookup(name, peak):
    assert peak_tflops(name) == peak


def test_percentile_matches_numpy_linear():
    import numpy as np

    values = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2]
    for q in (0, 50, 95, 100):
        assert percentile(sorted(values), q) == pytest.approx(float(np.percentile(values, q)))


class SleepyLoader:
    """Yields a batch after sleeping `delay` seconds: an input pipeline of known cost."""

    def __init__(self, delay, batch=4, steps=50):
        self.delay, self.batch, self.steps = delay, batch, steps

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for _ in range(self.steps):
            time.sleep(self.delay)
            yield torch.zeros(self.batch, 3, 2, 2), torch.zeros(self.batch, dtype=torch.long)


def test_host_side_stall_of_a_loader_that_sleeps():
    # 20 ms input wait + 30 ms of "step" per batch: 40% stall, 80 img/s at batch 4
    bench = Bench(with_fields(batch_size=4), None, DistEnv(0, 1, 0, torch.device("cpu")), Plan((), (), 2, 10, 2))
    windows, telemetry = bench.windows(SleepyLoader(0.020), lambda images, labels: time.sleep(0.030))
    assert len(windows) == 2 and all(w.steps == 10 for w in windows)
    for w in windows:
        assert w.stall_basis == "host_side"
        assert w.stall_fraction == pytest.approx(0.4, abs=0.05)
        assert w.img_per_s == pytest.approx(80, rel=0.1)
        assert w.step_stats()["p50_s"] == pytest.approx(0.050, abs=0.006)
    assert telemetry[0] == {"available": False, "reason": "no GPU"}


@pytest.mark.parametrize("stall, ratio, headroom, expected", [
    (0.30, 0.65, 0.8, "input-bound"),   # waits, far below the ceiling, loader slower than the GPU
    (0.20, None, None, "input-bound"),  # stall alone is enough
    (0.01, 0.97, 3.0, "GPU-bound"),
    (0.08, 0.85, 1.5, "balanced"),
    (0.02, 0.70, 2.0, "input-bound"),   # the cross-check (1 - ratio = 30%) overrules a low stall
])
def test_verdict_logic(stall, ratio, headroom, expected):
    result = verdict("dali", "cuda", stall, ratio, headroom)
    assert result["verdict"] == expected
    assert result["evidence"] and (result["next_steps"] or expected == "balanced")
    if expected == "input-bound":
        assert any("hw-decoder-load" in step for step in result["next_steps"])


def test_verdict_names_cpu_compute_and_missing_data():
    assert verdict("dali-cpu", "cpu", 0.0, 0.98, 5.0)["verdict"] == "compute-bound"
    assert verdict("torchvision", "cuda", 0.4, None, None)["next_steps"][0].startswith("switch to DALI")
    assert verdict("dali", "cuda", None, None, None)["verdict"] == "not available"


def test_time_to_train_90_epochs():
    # Hand-computed from ImageNet-1k's 1,281,167 training and 50,000 validation images, not the formula
    # restated: a wrong image count, epoch count or unit conversion gives other numbers.
    # 90 epochs x 1,281,167 = 115,305,030 images; at 1,000 img/s 115,305.03 s = 32.029 h.
    # Validation, estimated 3x faster: 90 x 50,000 = 4,500,000 images at 3,000 img/s = 1,500 s = 0.4167 h.
    t = time_to_train(1000.0)
    assert t["epochs"] == 90 and t["train_images"] == 1_281_167 and t["val_images"] == 50_000
    assert t["train_hours"] == pytest.approx(32.029, abs=1e-3)
    assert t["validation_hours_estimated"] == pytest.approx(0.4167, abs=1e-4)
    assert t["total_hours"] == pytest.approx(32.446, abs=1e-3)
    # the H100 DALI probe's end-to-end figure, 4,562 img/s: 115,305,030 / 4,562 = 25,275 s = 7.021 h,
    # plus 4,500,000 / 13,686 = 328.8 s = 0.0913 h of validation: 7.112 h in all
    t = time_to_train(4562.0)
    assert t["train_hours"] == pytest.approx(7.021, abs=1e-3)
    assert t["total_hours"] == pytest.approx(7.112, abs=1e-3)


@pytest.mark.slow
def test_report_from_a_real_run(data_dir, tmp_path):
    out = tmp_path / "bench"
    # --loaders left out: every loader this machine (no GPU) can run
    main(["--data", str(data_dir), "--out", str(out),
          "--modes", "synthetic,loader,train", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
          "--warmup-steps", "1", "--steps", "3", "--repeats", "2"])
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "rn50-bench/1"
    assert [(r["mode"], r["loader"]) for r in report["results"]] == [
        ("synthetic", "synthetic"), ("loader", "dali-cpu"), ("train", "dali-cpu"),
        ("loader", "torchvision-gpu"), ("train", "torchvision-gpu"),
        ("loader", "torchvision"), ("train", "torchvision")]
    for r in report["results"]:
        assert r["img_per_s"] > 0 and r["img_per_s_std"] is not None
        assert (r["warmup_steps"], r["timed_steps"], r["repeats"]) == (1, 3, 2)
        assert r["step_time"]["p50_s"] <= r["step_time"]["p95_s"]
        assert (r["stall"] is None) == (r["mode"] == "loader")
        assert r["mfu"] is None  # no GPU: no peak, so no MFU figure
        assert r["telemetry"]["available"] is False
    assert report["flops"]["peak_source"].startswith("not available")
    assert set(report["verdicts"]) == {"dali-cpu", "torchvision-gpu", "torchvision"}
    for v in report["verdicts"].values():
        assert v["verdict"] in ("input-bound", "compute-bound", "balanced")
        assert v["stall_basis"] == "host_side" and v["stall_cross_check"] == pytest.approx(1 - v["ratio_to_synthetic"])
    assert set(report["ratios"]["dali-cpu/torchvision"]) == {"loader", "train"}
    to_dali = report["ratios_to_dali"]
    assert to_dali["reference"] == "dali-cpu" and set(to_dali["loaders"]) == {"torchvision-gpu", "torchvision"}
    speed = {(r["mode"], r["loader"]): r["img_per_s"] for r in report["results"]}
    assert to_dali["loaders"]["torchvision-gpu"]["train"] == pytest.approx(
        speed[("train", "torchvision-gpu")] / speed[("train", "dali-cpu")])
    choice = report["recommendation"]
    assert choice["basis"] == "train"
    assert choice["fastest"] == max(("dali-cpu", "torchvision-gpu", "torchvision"), key=lambda n: speed[("train", n)])
    assert set(report["time_to_train_90_epochs"]) == {"dali-cpu", "torchvision-gpu", "torchvision", "synthetic"}
    env = report["environment"]
    for key in ("python", "torch", "dali", "cpu_cores", "git_commit", "world_size"):
        assert key in env
    assert report["config"]["dataset"]["train_images"] == N_TRAIN_IMAGES
    markdown = (out / "report.md").read_text()
    assert "## Verdicts" in markdown and "## Each loader against dali-cpu" in markdown
    assert f"## Which loader should I use here\n\n{choice['text']}" in markdown
    assert (out / "throughput.png").stat().st_size > 1000 and (out / "timeline.png").stat().st_size > 1000


def test_autotune_saves_a_preset_train_can_read(data_dir, tmp_path):
    out = tmp_path / "tune"
    main(["--data", str(data_dir), "--out", str(out), "--loaders", "dali-cpu", "--modes", "loader",
          "--image-size", "32", "--batch-size", "8", "--warmup-steps", "1", "--steps", "2", "--repeats", "1",
          "--autotune"])
    report = json.loads((out / "report.json").read_text())
    tuned = report["autotune"]["loaders"]["dali-cpu"]
    assert report["autotune"]["preset_loader"] == "dali-cpu"
    assert len(tuned["sweep"]) == len({(r["dali_threads"], r["prefetch"]) for r in tuned["sweep"]}) >= 3
    assert tuned["best"]["img_per_s"] == max(r["img_per_s"] for r in tuned["sweep"])
    from rn50.recipe import load_presets

    machine = load_presets(str(out / "autotuned.toml")).machine  # loader settings: machine, not recipe
    assert (machine.dali_threads, machine.prefetch) == (tuned["best"]["dali_threads"], tuned["best"]["prefetch"])
    assert machine.loader == "dali-cpu"


def test_harness_user_errors(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(data_dir), "--out", str(tmp_path), "--modes", "fast"])
    assert exit_info.value.code == 2 and "unknown mode 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing folder", "unfinished run", "not a summary", "report folder is a file"])
def test_harness_inputs_are_checked_before_the_first_measurement(case, data_dir, tmp_path, capsys, monkeypatch):
    """A bad --training-runs folder or --out used to surface only after every measurement had finished."""
    def measured(*args, **kwargs):
        raise AssertionError("measured before checking its inputs")

    monkeypatch.setattr(Bench, "measure", measured)
    run, out = tmp_path / "run", tmp_path / "bench"
    if case == "unfinished run":
        run.mkdir()
        (run / "metrics.jsonl").write_text("{}\n")
    elif case == "not a summary":
        run.mkdir()
        (run / "summary.json").write_text('{"epochs": 3}')
    elif case == "report folder is a file":
        out.write_text("not a folder")
        run = None
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(data_dir), "--out", str(out), "--modes", "synthetic", "--loaders", "", "--arch",
              "resnet18", "--image-size", "32", "--batch-size", "8",
              *(["--training-runs", str(run)] if run else [])])
    stdout, err = capsys.readouterr()
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    expected = {"missing folder": "does not exist", "unfinished run": "has no summary.json",
                "not a summary": "is not an rn50.train summary", "report folder is a file": "cannot write"}[case]
    assert expected in err and stdout == "", (err, stdout)


def test_time_to_accuracy_of_training_runs_in_the_report(data_dir, tmp_path):
    from rn50.train import main as train

    run = tmp_path / "run"
    train(["--data", str(data_dir), "--out", str(run), "--loader", "dali-cpu", "--arch", "resnet18",
           "--image-size", "32", "--batch-size", "8", "--dali-threads", "1", "--epochs", "3", "--target-top1", "1"])
    out = tmp_path / "bench"
    main(["--data", str(data_dir), "--out", str(out), "--modes", "synthetic", "--loaders", "", "--arch", "resnet18",
          "--image-size", "32", "--batch-size", "8", "--warmup-steps", "1", "--steps", "2", "--training-runs", str(run)])
    report = json.loads((out / "report.json").read_text())
    (row,) = report["time_to_accuracy"]
    summary = json.loads((run / "summary.json").read_text())
    assert row["reached"] and row["epochs"] == 1 and row["time_s"] == summary["target"]["time_s"]
    assert "## Time to accuracy" in (out / "report.md").read_text()


@pytest.mark.slow
def test_two_ranks_report_per_rank_aggregate_and_scaling(data_dir, tmp_path):
    from conftest import run_cli, torchrun

    out = tmp_path / "bench"
    done = run_cli(torchrun(2, "-m", "benchmarks.run", "--data", str(data_dir), "--out", str(out),
                            "--modes", "synthetic,train", "--loaders", "dali-cpu", "--arch", "resnet18",
                            "--image-size", "32", "--batch-size", "4", "--warmup-steps", "1", "--steps", "3",
                            "--repeats", "2", "--dali-threads", "1"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["world_size"] == 2 and report["environment"]["launcher"] == "torchrun"
    for row in report["results"]:
        assert [r["rank"] for r in row["per_rank"]] == [0, 1]
        assert row["img_per_s"] == pytest.approx(sum(r["img_per_s"] for r in row["per_rank"]), rel=0.01)
        assert row["img_per_s_per_gpu"] == pytest.approx(row["img_per_s"] / 2)
    scaling = report["scaling"]
    synthetic = next(r for r in report["results"] if r["mode"] == "synthetic")
    assert scaling["aggregate_img_per_s"] == synthetic["img_per_s"] and scaling["single_gpu_img_per_s"] > 0
    assert scaling["efficiency"] == pytest.approx(scaling["aggregate_img_per_s"] / (2 * scaling["single_gpu_img_per_s"]))


# --- which loader should I use here: drawn from the figures ------------------------------------------------

def result(mode, loader, img_per_s):
    return {"mode": mode, "loader": loader, "img_per_s": img_per_s}


def verdicts_of(**labels):
    return {name: {"verdict": label, "ratio_to_synthetic": ratio, "stall_fraction": stall}
            for name, (label, ratio, stall) in labels.items()}


def test_ratios_to_dali_use_the_gpu_pipeline_when_it_was_measured():
    results = [result("loader", "dali", 4000), result("loader", "dali-cpu", 1000), result("train", "dali", 2000),
               result("loader", "torchvision-gpu", 3000), result("train", "torchvision-gpu", 1500)]
    to_dali = ratios_to_dali(results)
    assert to_dali["reference"] == "dali"
    assert to_dali["loaders"] == {"dali-cpu": {"loader": 0.25}, "torchvision-gpu": {"loader": 0.75, "train": 0.75}}
    without_gpu = ratios_to_dali([result("loader", "dali-cpu", 1000), result("loader", "torchvision", 500)])
    assert without_gpu == {"reference": "dali-cpu", "loaders": {"torchvision": {"loader": 0.5}}}
    assert ratios_to_dali([result("loader", "torchvision", 500)]) is None


def test_the_answer_names_the_fastest_its_ties_and_who_keeps_the_model_fed():
    results = [result("train", "dali", 2900), result("train", "torchvision-gpu", 2800),
               result("train", "dali-hybrid", 2500), result("train", "torchvision", 900)]
    verdicts = verdicts_of(**{"dali": ("GPU-bound", 0.97, 0.01), "torchvision-gpu": ("GPU-bound", 0.94, 0.02),
                              "dali-hybrid": ("GPU-bound", 0.91, 0.03), "torchvision": ("input-bound", 0.3, 0.7)})
    answer = recommend(results, verdicts, ratios_to_dali(results), "cuda", 8)
    assert answer["fastest"] == "dali" and answer["within_noise"] == ["torchvision-gpu"]  # 2800 >= 95% of 2900
    assert answer["keeps_model_fed"] == ["dali", "torchvision-gpu", "dali-hybrid"]
    text = answer["text"]
    assert "8 GPUs" in text and "dali is the fastest loader end to end" in text and "2,900 img/s" in text
    assert "torchvision-gpu (2,800) is within 5%" in text and "97% of the synthetic-data ceiling" in text
    assert "so do dali-hybrid" in text and "torchvision 0.31x" in text


def test_the_answer_when_every_loader_starves_the_model():
    results = [result("train", "dali-cpu", 300), result("train", "torchvision", 100)]
    verdicts = verdicts_of(**{"dali-cpu": ("input-bound", 0.4, 0.55), "torchvision": ("input-bound", 0.1, 0.9)})
    answer = recommend(results, verdicts, ratios_to_dali(results), "cpu", 1)
    assert answer["fastest"] == "dali-cpu" and answer["within_noise"] == [] and answer["keeps_model_fed"] == []
    assert "Even dali-cpu leaves the model waiting for input (55% of the step)" in answer["text"]
    assert "share the same cores" in answer["text"]  # a CPU run says what its ranking is worth


def test_the_answer_from_loader_mode_alone_says_so():
    results = [result("loader", "torchvision-gpu", 800), result("loader", "dali-cpu", 600)]
    answer = recommend(results, {}, ratios_to_dali(results), "cpu", 1)
    assert answer["basis"] == "loader" and answer["fastest"] == "torchvision-gpu"
    assert "loader-mode figures only" in answer["text"] and "torchvision-gpu 1.33x" in answer["text"]
    assert recommend([result("synthetic", "synthetic", 100)], {}, None, "cpu", 1) is None


def test_cpu_machines_default_to_every_loader_that_runs_on_the_cpu(data_dir, tmp_path, capsys):
    from benchmarks.run import default_loaders

    assert default_loaders(False) == ("dali-cpu", "torchvision-gpu", "torchvision")
    assert default_loaders(True) == ("dali", "dali-hybrid", "dali-cpu", "torchvision-gpu", "torchvision")
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(data_dir), "--out", str(tmp_path / "b"), "--loaders", "dali-hybrid,torchvision"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "dali-hybrid needs a CUDA GPU" in err
    assert "--loaders dali-cpu,torchvision-gpu,torchvision" in err
