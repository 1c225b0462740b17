"""The GPU path: mixed (nvJPEG) decode, fp16 channels_last on the device, NCCL DDP, AMP.

Skipped without CUDA; run on a GPU machine with `pytest -m gpu`. The same behaviour is covered on the
CPU path by test_pipelines.py and test_train_cli.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipelines import build_loader
from rn50.dist import DistEnv
from rn50.recipe import with_fields
from rn50.step import build_training, train_step

from conftest import CLASSES, N_TRAIN_IMAGES, N_VAL_IMAGES, gpu_ddp_processes, run_cli, torchrun

pytestmark = pytest.mark.gpu


def gpu_loader(split, data_dir, **kw):
    """The DALI GPU loader in fp16, the dtype the AMP step computes in (build_loader's default is fp32)."""
    return build_loader("dali", split, data_dir, **{"batch_size": 8, "image_size": 64, "device": "cuda:0",
                                                    "dtype": torch.float16, **kw})


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("hw_decoder_load", [0.0, 0.65])
def test_dali_gpu_training_batches_are_fp16_channels_last_on_the_gpu(data_dir, fused, hw_decoder_load):
    loader = gpu_loader("train", data_dir, fused_decode=fused, hw_decoder_load=hw_decoder_load)
    assert len(loader) == N_TRAIN_IMAGES // 8
    for images, labels in loader:
        assert images.is_cuda and labels.is_cuda
        assert images.dtype == torch.float16 and labels.dtype == torch.int64
        assert images.shape == (8, 3, 64, 64)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(images).all() and -2.2 <= images.min() and images.max() <= 2.7
        assert 0 <= labels.min() and labels.max() < CLASSES


def test_nchw_view_of_dali_output_is_zero_copy(data_dir):
    loader = gpu_loader("train", data_dir)
    outputs = next(iter(loader._iterator))
    nhwc = outputs[0]["images"]
    nchw = nhwc.permute(0, 3, 1, 2)
    assert nchw.data_ptr() == nhwc.data_ptr() and nchw.is_contiguous(memory_format=torch.channels_last)


def test_dali_gpu_validation_matches_the_cpu_pipeline(data_dir):
    gpu = torch.cat([x.float().cpu() for x, _ in gpu_loader("val", data_dir)])
    cpu = torch.cat([x.float() for x, _ in build_loader("dali-cpu", "val", data_dir, batch_size=8, image_size=64)])
    assert gpu.shape == cpu.shape == (N_VAL_IMAGES, 3, 64, 64)
    # nvJPEG and libjpeg-turbo round differently (IDCT, chroma upsampling): close, not identical
    assert (gpu - cpu).abs().mean() < 0.05


@pytest.mark.parametrize("kind", ["dali-hybrid", "torchvision-gpu"])
def test_the_other_gpu_loaders_give_fp16_channels_last_batches_on_the_gpu(data_dir, kind):
    loader = build_loader(kind, "train", data_dir, batch_size=8, image_size=64, device="cuda:0",
                          dtype=torch.float16, workers=2, dali_threads=2)
    assert len(loader) == N_TRAIN_IMAGES // 8
    for epoch in range(2):  # the second epoch reuses the stream, the buffers and the threads
        loader.set_epoch(epoch)
        for images, labels in loader:
            assert images.is_cuda and labels.is_cuda and images.dtype == torch.float16
            assert images.shape == (8, 3, 64, 64) and images.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(images).all() and -2.2 <= images.min() and images.max() <= 2.7
            assert 0 <= labels.min() and labels.max() < CLASSES


@pytest.mark.parametrize("kind", ["dali-hybrid", "torchvision-gpu"])
def test_the_other_gpu_loaders_validate_as_torchvision_does(data_dir, kind):
    """The shootout's promise: every loader's validation within 0.005 mean absolute difference of the
    torchvision loader's (both decode on the CPU with libjpeg-turbo; resize on the GPU)."""
    gpu = torch.cat([x.float().cpu() for x, _ in build_loader(kind, "val", data_dir, batch_size=8, image_size=64,
                                                               device="cuda:0", workers=2, dali_threads=2)])
    tv = torch.cat([x.float() for x, _ in build_loader("torchvision", "val", data_dir, batch_size=8, image_size=64,
                                                        workers=0)])
    assert gpu.shape == tv.shape == (N_VAL_IMAGES, 3, 64, 64)
    assert (gpu - tv).abs().mean() < 0.005, (gpu - tv).abs().mean()


def test_amp_fp16_channels_last_step_on_the_gpu(data_dir):
    env = DistEnv(0, 1, 0, torch.device("cuda", 0))
    parts = build_training(with_fields(arch="resnet50", batch_size=8), CLASSES, env)
    assert parts.amp_dtype == torch.float16 and parts.scaler.is_enabled()
    conv = parts.raw_model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    losses = []
    for images, labels in gpu_loader("train", data_dir):
        assert images.dtype == torch.float16  # the AMP step is fed the fp16 batches training gives it
        for group in parts.optimizer.param_groups:
            group["lr"] = 0.01
        losses.append(train_step(parts, images, labels))
    losses = torch.stack(losses).float()
    assert torch.isfinite(losses).all()


def gpu_run(data_dir, tmp_path, nproc, extra):
    out = tmp_path / "run"
    done = run_cli(torchrun(nproc, "-m", "rn50.train", "--data", str(data_dir), "--out", str(out),
                            "--loader", "dali", "--epochs", "2", "--batch-size", "8", "--image-size", "64",
                            "--arch", "resnet18", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["val/count"] == N_VAL_IMAGES
    assert summary["ddp/replicas_identical"] is True
    assert summary["environment"]["gpu"]


EXTRAS = [[], ["--sync-bn", "--ema-decay", "0.99", "--randaugment-magnitude", "7"]]


@pytest.mark.slow
@pytest.mark.parametrize("extra", EXTRAS)
def test_one_process_run_with_the_gpu_pipeline(data_dir, tmp_path, extra):
    gpu_run(data_dir, tmp_path, 1, extra)  # passes on one GPU: what it checks needs no second one


@pytest.mark.slow
@pytest.mark.parametrize("extra", EXTRAS)
def test_nccl_ddp_run_with_the_gpu_pipeline(data_dir, tmp_path, extra):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL across ranks needs 2 GPUs (one process per GPU)")
    gpu_run(data_dir, tmp_path, gpu_ddp_processes(torch.cuda.device_count()), extra)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dali-hybrid", "torchvision-gpu"])
def test_training_runs_with_the_other_gpu_loaders(data_dir, tmp_path, kind):
    nproc = gpu_ddp_processes(torch.cuda.device_count())
    out = tmp_path / "run"
    done = run_cli(torchrun(nproc, "-m", "rn50.train", "--data", str(data_dir), "--out", str(out),
                            "--loader", kind, "--epochs", "1", "--batch-size", "8", "--image-size", "64",
                            "--arch", "resnet18", "--workers", "2", "--dali-threads", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["val/count"] == N_VAL_IMAGES and summary["ddp/replicas_identical"] is True


def test_gpu_timeline_stall_of_a_loader_that_sleeps():
    """A 20 ms input wait against ~8 ms of GPU work per step: the GPU idles ~12 of every ~20 ms."""
    from benchmarks.run import Bench, Plan
    from test_benchmarks import SleepyLoader

    matrix = torch.randn(2048, 2048, device="cuda")

    def work(images, labels):
        for _ in range(repeats):
            matrix @ matrix

    # calibrate the GPU work to about 8 ms on this GPU
    repeats = 1
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    work(None, None)
    start.record(); work(None, None); end.record(); torch.cuda.synchronize()
    repeats = max(1, round(8.0 / start.elapsed_time(end)))
    start.record(); work(None, None); end.record(); torch.cuda.synchronize()
    busy_s = start.elapsed_time(end) / 1e3

    bench = Bench(with_fields(batch_size=4), None, DistEnv(0, 1, 0, torch.device("cuda", 0)), Plan((), (), 3, 20, 1))
    windows, telemetry = bench.windows(SleepyLoader(0.020, steps=100), work)
    window = windows[0]
    assert window.stall_basis == "gpu_timeline"
    expected = (0.020 - busy_s) / 0.020
    assert window.stall_fraction == pytest.approx(expected, abs=0.1)
    # NVML may be absent in a container: then it is reported with its reason, never an error. When it is
    # there, the window must have been sampled and the figures must be numbers.
    tele = telemetry[0]
    assert isinstance(tele["available"], bool)
    if tele["available"]:
        assert isinstance(tele["samples"], int) and tele["samples"] > 0, tele
        for key in ("power_w", "gpu_util_pct"):
            value = tele[key]
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, tele)
            assert value == value and value >= 0, (key, tele)  # not NaN, not negative
        assert tele["gpu_util_pct"] <= 100 and tele["power_w"] > 0, tele
    else:
        assert isinstance(tele.get("reason"), str) and tele["reason"].strip(), tele


@pytest.mark.slow
def test_harness_full_report_on_the_gpu(data_dir, tmp_path):
    """Every loader by default, all modes: MFU from the peak table, stall on the GPU timeline, NVML telemetry,
    each loader against DALI and the answer to "which loader here"."""
    from benchmarks.run import main as bench

    loaders = ("dali", "dali-hybrid", "dali-cpu", "torchvision-gpu", "torchvision")
    out = tmp_path / "bench"
    bench(["--data", str(data_dir), "--out", str(out),
           "--image-size", "64", "--batch-size", "8", "--warmup-steps", "3", "--steps", "5", "--repeats", "2",
           "--workers", "2", "--dali-threads", "2"])
    report = json.loads((out / "report.json").read_text())
    assert {(r["mode"], r["loader"]) for r in report["results"]} == {
        ("synthetic", "synthetic"), *((m, l) for m in ("loader", "train") for l in loaders)}
    for row in report["results"]:
        if row["mode"] != "loader":
            assert row["stall"]["basis"] == "gpu_timeline"
            assert (row["mfu"] is None) == (report["flops"]["peak_tflops"] is None)
    assert set(report["verdicts"]) == set(loaders)
    assert "dali/torchvision" in report["ratios"]
    assert report["ratios_to_dali"]["reference"] == "dali"
    assert set(report["ratios_to_dali"]["loaders"]) == set(loaders) - {"dali"}
    assert report["recommendation"]["fastest"] in loaders
