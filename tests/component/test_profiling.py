"""--profile-steps: the trace files of training and the harness, the named ranges in them, the all-reduce's
comm hook composed with fp16 compression, and the one-line errors."""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch

from benchmarks import run as bench_run
from pipelines import profiler_ranges
from rn50.observe import profiling
from rn50.core import step as step_module
from rn50.system.dist import DistEnv
from rn50.observe.profiling import named_range
from rn50.config.machine import Machine
from rn50.config.recipe import with_fields
from rn50.train import main as train_main

from conftest import run_cli, torchrun

SMALL = ["--loader", "dali-cpu", "--arch", "resnet18", "--image-size", "32", "--batch-size", "4",
         "--dali-threads", "1", "--seed", "1"]  # 48 training images: 12 steps per epoch
STEP_RANGES = ("input wait", "host-to-device copy", "forward", "backward", "optimizer step")


def annotations(path) -> collections.Counter:
    """The record_function ranges of a Chrome trace, by name (the file must parse as JSON)."""
    trace = json.loads(path.read_text())
    return collections.Counter(e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def test_training_traces_the_window_with_every_named_range(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train_main(["--data", str(data_dir), "--out", str(out), "--epochs", "1", *SMALL, "--profile-steps", "2:4"])
    trace = out / "profile" / "rank0.pt.trace.json"
    names = annotations(trace)
    # steps 2, 3 and 4: each range once per step, none from the 9 steps outside the window
    assert {name: names[name] for name in STEP_RANGES} == {name: 3 for name in STEP_RANGES}
    assert sorted(name for name in names if name.startswith("ProfilerStep#")) == [
        "ProfilerStep#2", "ProfilerStep#3", "ProfilerStep#4"]  # the global steps asked for
    assert f"steps 2-4 traced into {trace}" in capsys.readouterr().out
    assert not profiler_ranges._on  # off again after the window


def test_ranges_are_no_ops_outside_a_window():
    assert named_range("forward") is named_range("backward")  # the one shared no-op
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with named_range("forward"):
            torch.ones(2).sum()
        profiler_ranges.enable(True)
        try:
            with named_range("backward"):
                torch.ones(2).sum()
        finally:
            profiler_ranges.enable(False)
    recorded = {e.name for e in prof.events()}
    assert "backward" in recorded and "forward" not in recorded


class _FakeDDP(torch.nn.Module):
    """DistributedDataParallel's place in build_training, without a process group: keeps the comm hook."""

    def __init__(self, module, **kwargs):
        super().__init__()
        self.module, self.hook = module, None

    def register_comm_hook(self, state, hook):
        assert self.hook is None, "DDP takes one comm hook"
        self.hook = hook


@pytest.mark.parametrize("fp16", [False, True])
def test_all_reduce_range_wraps_whichever_comm_hook_runs(monkeypatch, fp16):
    called = []
    monkeypatch.setattr(step_module, "DistributedDataParallel", _FakeDDP)
    monkeypatch.setattr(step_module.default_hooks, "allreduce_hook", lambda s, b: called.append("allreduce"))
    monkeypatch.setattr(step_module.default_hooks, "fp16_compress_hook", lambda s, b: called.append("fp16"))
    two_ranks = DistEnv(0, 2, 0, torch.device("cpu"))
    recipe, machine = with_fields(arch="resnet18", batch_size=4), Machine(ddp_fp16_compress=fp16)
    # not profiling: DDP's built-in all-reduce (no Python hook), or the fp16 hook as it is
    plain = step_module.build_training(recipe, 3, two_ranks, machine).model.hook
    assert plain is (step_module.default_hooks.fp16_compress_hook if fp16 else None)
    hook = step_module.build_training(recipe, 3, two_ranks, machine, profiling=True).model.hook
    profiler_ranges.enable(True)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            hook(None, "bucket")
    finally:
        profiler_ranges.enable(False)
    assert called == ["fp16" if fp16 else "allreduce"]
    assert "all-reduce" in {e.name for e in prof.events()}


def test_harness_writes_a_trace_per_measurement_and_links_them(data_dir, tmp_path):
    out = tmp_path / "bench"
    bench_run.main(["--data", str(data_dir), "--out", str(out), "--modes", "synthetic,train", "--loaders", "dali-cpu",
                    "--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--warmup-steps", "2",
                    "--steps", "2", "--repeats", "1", "--profile-steps", "2:3"])
    report = json.loads((out / "report.json").read_text())
    profile = report["profile"]
    assert (profile["steps"], profile["tool"], profile["in_warm_up"]) == ("2:3", "torch", False)
    paths = {(t["mode"], t["loader"]): t["path"] for t in profile["traces"]}
    assert paths == {("synthetic", "synthetic"): "profile/synthetic/rank0.pt.trace.json",
                     ("train", "dali-cpu"): "profile/train-dali-cpu/rank0.pt.trace.json"}
    train, synthetic = annotations(out / paths["train", "dali-cpu"]), annotations(out / paths["synthetic", "synthetic"])
    assert {name: train[name] for name in STEP_RANGES} == {name: 2 for name in STEP_RANGES}
    assert synthetic["forward"] == 2 and synthetic["host-to-device copy"] == 0  # the batch never leaves the device
    assert {name for name in train if name.startswith("ProfilerStep#")} == {"ProfilerStep#2", "ProfilerStep#3"}
    markdown = (out / "report.md").read_text()
    assert "## Profiler traces" in markdown and "include the profiler's cost" in markdown
    for path in paths.values():
        assert f"]({path})" in markdown


@pytest.mark.parametrize("value", ["3:1", "0:2", "1-3", "2", "a:b"])
@pytest.mark.parametrize("cli", [train_main, bench_run.main], ids=["train", "harness"])
def test_bad_profile_steps_are_one_line_errors(cli, value, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli(["--data", str(data_dir), "--out", str(tmp_path / "out"), "--profile-steps", value])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --profile-steps") and "A:B" in err and "\n" not in err


def test_steps_past_the_run_are_refused_at_start_up(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train_main(["--data", str(data_dir), "--out", str(out), "--epochs", "1", *SMALL, "--profile-steps", "10:13"])
    assert stopped.value.code == 2
    assert "has 12 steps; choose steps within 1:12" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()  # refused before training
    with pytest.raises(SystemExit) as stopped:  # the harness: 2 warm-up + 1 x (1 + 2) = 5 steps per measurement
        bench_run.main(["--data", str(data_dir), "--out", str(tmp_path / "bench"), "--modes", "synthetic",
                        "--loaders", "dali-cpu", "--warmup-steps", "2", "--steps", "2", "--repeats", "1",
                        "--profile-steps", "5:6"])
    assert stopped.value.code == 2 and "has 5 steps" in capsys.readouterr().err
    assert not (tmp_path / "bench" / "report.json").exists()


def test_nsys_without_cuda_is_a_one_line_error(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        train_main(["--data", str(data_dir), "--out", str(tmp_path / "run"), *SMALL, "--profile-steps", "1:2",
                    "--profiler", "nsys"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --profiler nsys needs a CUDA device (NVTX ranges, "
                                               "cudaProfilerApi capture range); use --profiler torch here")


def test_a_resumed_run_profiles_what_is_left_of_the_window_or_says_nothing_was(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", str(data_dir), "--out", str(out), *SMALL]
    train_main([*common, "--epochs", "1"])  # steps 1-12
    capsys.readouterr()
    train_main([*common, "--epochs", "2", "--resume", "auto", "--profile-steps", "11:14"])
    assert "steps 13-14 (of the 11-14 asked for" in capsys.readouterr().out
    names = annotations(out / "profile" / "rank0.pt.trace.json")
    assert names["forward"] == 2 and names["ProfilerStep#13"] == names["ProfilerStep#14"] == 1
    train_main([*common, "--epochs", "3", "--resume", "auto", "--profile-steps", "1:3"])
    assert "warning: --profile-steps 1:3: no step of the window ran in this run" in capsys.readouterr().out


@pytest.mark.slow
def test_two_process_run_names_the_all_reduce_on_every_rank(data_dir, tmp_path):
    out = tmp_path / "run"
    done = run_cli(torchrun(2, "-m", "rn50.train", "--data", str(data_dir), "--out", str(out), "--epochs", "1",
                            *SMALL, "--profile-steps", "2:3"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for rank in (0, 1):
        names = annotations(out / "profile" / f"rank{rank}.pt.trace.json")
        assert names["all-reduce"] >= 2  # at least one bucket per step
        assert all(names[name] == 2 for name in STEP_RANGES)


def test_profiler_start_and_stop_write_no_usdt_lines_but_other_stderr_passes(capfd):
    """Kineto prints "USDT:... profiler_start" and "... profiler_stop" at every trace start and stop; they
    are dropped, and whatever else reaches file descriptor 2 meanwhile still comes out."""
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    profiling.without_usdt_marks(profile.start)
    torch.ones(3).add_(1)

    def stop_and_write():
        profile.stop()
        os.write(2, b"another line on stderr\n")

    profiling.without_usdt_marks(stop_and_write)
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "profiler_stop" not in err and "USDT" not in err, err
    assert "another line on stderr" in err


def test_plain_torch_profiler_prints_the_usdt_lines_the_filter_drops(capfd):
    """The control for the test above: without the filter, this torch prints the lines (if a later torch
    stops printing them, the filter has nothing left to do and this says so)."""
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    profile.start()
    profile.stop()
    err = capfd.readouterr().err
    if "profiler_start" not in err:
        pytest.skip("this torch's profiler prints no USDT lines")
    assert any(profiling._USDT_MARK.match(line.encode()) for line in err.splitlines()), err
