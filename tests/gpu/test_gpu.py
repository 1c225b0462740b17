"""The GPU path: mixed (nvJPEG) decode, fp16 channels_last on the device, NCCL DDP, AMP, exact DALI resume and
progressive resizing on the GPU, and --cuda-graphs under an NCCL DDP group.

Skipped without CUDA; run on a GPU machine with `pytest -m gpu`. The same behaviour is covered on the
CPU path by the CPU tiers (tests/component: test_pipelines.py, test_shards.py, test_graphs.py; tests/e2e:
test_train_cli.py). Everything here needs one GPU only, apart from the NCCL run across two ranks (skipped with one
GPU: its one-process twin runs instead, and the NCCL DDP group of one below captures --cuda-graphs).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from pipelines import build_loader
from pipelines.augmentation import MEAN, STD, Augmentation
from pipelines.folder import list_split
from rn50.system.dist import DistEnv
from rn50.core.graphs import WARMUP_STEPS, WARMUP_STEPS_DDP
from rn50.config.machine import Machine
from rn50.config.recipe import with_fields
from rn50.core.step import build_training, train_step

from conftest import CLASSES, N_TRAIN_IMAGES, N_VAL_IMAGES, ROOT, SleepyLoader, gpu_ddp_processes, run_cli, torchrun

pytestmark = pytest.mark.gpu

# The GPU test data: the shared generated dataset (baseline 4:2:0 RGB JPEGs, as most of ImageNet) with the first
# three files of every class folder, in both splits, re-encoded as the JPEGs a GPU decoder handles apart:
# grayscale (one component, expanded to RGB by the decoder), progressive (nvJPEG's hardware decoder takes
# baseline JPEGs only; these go to another backend) and both. ImageNet holds both kinds. Same files, same names:
# the counts every test relies on are unchanged.
REENCODED = (("L", False), ("RGB", True), ("L", True))  # (PIL mode, progressive), by position in the folder


@pytest.fixture(scope="session")
def gpu_data(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-data") / "imagenet-like"
    shutil.copytree(data_dir, out)
    for split in ("train", "val"):
        for class_dir in sorted(p for p in (out / split).iterdir() if p.is_dir()):
            for path, (mode, progressive) in zip(sorted(class_dir.glob("*.JPEG")), REENCODED):
                with Image.open(path) as image:
                    pixels = image.convert(mode)
                pixels.save(path, "JPEG", quality=90, progressive=progressive,
                            **({"subsampling": 2} if mode == "RGB" else {}))
    return out


def jpeg_kind(path: str) -> str:
    """"baseline", "progressive", "gray-baseline" or "gray-progressive", from the file itself."""
    with Image.open(path) as image:
        gray, progressive = image.mode == "L", bool(image.info.get("progressive"))
    return ("gray-" if gray else "") + ("progressive" if progressive else "baseline")


def gpu_loader(split, data, **kw):
    """The DALI GPU loader in fp16, the dtype the AMP step computes in (build_loader's default is fp32)."""
    return build_loader("dali", split, data, **{"batch_size": 8, "image_size": 64, "device": "cuda:0",
                                                "dtype": torch.float16, **kw})


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("hw_decoder_load", [0.0, 0.65])
def test_dali_gpu_training_batches_are_fp16_channels_last_on_the_gpu(gpu_data, fused, hw_decoder_load):
    loader = gpu_loader("train", gpu_data, fused_decode=fused, hw_decoder_load=hw_decoder_load)
    assert len(loader) == N_TRAIN_IMAGES // 8
    for images, labels in loader:
        assert images.is_cuda and labels.is_cuda
        assert images.dtype == torch.float16 and labels.dtype == torch.int64
        assert images.shape == (8, 3, 64, 64)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(images).all() and -2.2 <= images.min() and images.max() <= 2.7
        assert 0 <= labels.min() and labels.max() < CLASSES


def test_nchw_view_of_dali_output_is_zero_copy(gpu_data):
    loader = gpu_loader("train", gpu_data)
    outputs = next(iter(loader._iterator))
    nhwc = outputs[0]["images"]
    nchw = nhwc.permute(0, 3, 1, 2)
    assert nchw.data_ptr() == nhwc.data_ptr() and nchw.is_contiguous(memory_format=torch.channels_last)


def test_dali_gpu_validation_matches_the_cpu_pipeline(gpu_data):
    gpu = torch.cat([x.float().cpu() for x, _ in gpu_loader("val", gpu_data)])
    cpu = torch.cat([x.float() for x, _ in build_loader("dali-cpu", "val", gpu_data, batch_size=8, image_size=64)])
    assert gpu.shape == cpu.shape == (N_VAL_IMAGES, 3, 64, 64)
    # nvJPEG and libjpeg-turbo round differently (IDCT, chroma upsampling): close, not identical
    assert (gpu - cpu).abs().mean() < 0.05


@pytest.mark.parametrize("kind", ["dali-hybrid", "torchvision-gpu"])
def test_the_other_gpu_loaders_give_fp16_channels_last_batches_on_the_gpu(gpu_data, kind):
    loader = build_loader(kind, "train", gpu_data, batch_size=8, image_size=64, device="cuda:0",
                          dtype=torch.float16, workers=2, dali_threads=2)
    assert len(loader) == N_TRAIN_IMAGES // 8
    for epoch in range(2):  # the second epoch reuses the stream, the buffers and the threads
        loader.set_epoch(epoch)
        for images, labels in loader:
            assert images.is_cuda and labels.is_cuda and images.dtype == torch.float16
            assert images.shape == (8, 3, 64, 64) and images.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(images).all() and -2.2 <= images.min() and images.max() <= 2.7
            assert 0 <= labels.min() and labels.max() < CLASSES


# Validation against the torchvision loader (PIL: libjpeg-turbo, then PIL's resize), mean |difference| in normalised
# units, where one level of 255 is about 0.017. dali-hybrid and torchvision-gpu decode with libjpeg-turbo as PIL
# does and differ only by resizing on the GPU: 0.005, the shootout's promise. `dali` decodes with nvJPEG (CUDA or
# the hardware decoder), whose IDCT is not libjpeg-turbo's integer one: pixels may be a level apart; 0.02 allows
# about every pixel one level off, and stays below what a decode fault costs (nvJPEG's own chroma upsampling,
# without jpeg_fancy_upsampling, measured 0.032 on 4:2:0 JPEGs; a channel swap or a wrongly expanded gray image
# costs far more). Grayscale and progressive JPEGs are held to the very tolerance of the baseline ones.
VAL_TOLERANCE = {"dali": 0.02, "dali-hybrid": 0.005, "torchvision-gpu": 0.005}


def gray_levels(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] normalised batches back to 0-255 levels, channel by channel."""
    mean = torch.tensor(MEAN)[None, :, None, None] * 255
    std = torch.tensor(STD)[None, :, None, None] * 255
    return images.float().cpu() * std + mean


@pytest.mark.parametrize("kind", ["dali", "dali-hybrid", "torchvision-gpu"])
def test_gpu_loaders_validate_grayscale_and_progressive_jpegs_as_torchvision_does(gpu_data, kind):
    """Every GPU loader gives 3-channel validation batches, and its grayscale and progressive JPEGs come out as
    close to the torchvision loader's as its baseline JPEGs do (the shootout's promise, image by image kind)."""
    kinds = [jpeg_kind(f) for f in list_split(str(gpu_data), "val").files]  # the loaders' order: the list's
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "baseline": N_VAL_IMAGES - 3 * CLASSES, "progressive": CLASSES, "gray-baseline": CLASSES,
        "gray-progressive": CLASSES}
    loader = build_loader(kind, "val", gpu_data, batch_size=8, image_size=64, device="cuda:0", workers=2,
                          dali_threads=2)
    batches = list(loader)
    assert all(x.is_cuda and x.shape[1:] == (3, 64, 64) for x, _ in batches)
    gpu = torch.cat([x.float().cpu() for x, _ in batches])
    reference = list(build_loader("torchvision", "val", gpu_data, batch_size=8, image_size=64, workers=0))
    tv = torch.cat([x.float() for x, _ in reference])
    assert gpu.shape == tv.shape == (N_VAL_IMAGES, 3, 64, 64)
    assert torch.cat([y.cpu() for _, y in batches]).tolist() == torch.cat([y for _, y in reference]).tolist()
    per_image = (gpu - tv).abs().mean(dim=(1, 2, 3))
    by_kind = {k: per_image[[i for i, got in enumerate(kinds) if got == k]].mean().item() for k in set(kinds)}
    assert all(value < VAL_TOLERANCE[kind] for value in by_kind.values()), by_kind
    # a grayscale JPEG is R = G = B in every loader's output: recovering the 0-255 levels from the normalised
    # fp32 values costs ~1e-4 of a level; half a level apart means a channel was decoded or scaled on its own
    for name, images in ((kind, gpu), ("torchvision", tv)):
        levels = gray_levels(images[[i for i, got in enumerate(kinds) if got.startswith("gray")]])
        spread = (levels.amax(dim=1) - levels.amin(dim=1)).max().item()
        assert spread < 0.5, f"{name}: the channels of a grayscale JPEG differ by {spread:.2f} levels"


def epoch_of(loader, epoch: int) -> list:
    """Epoch `epoch`'s batches (the rest of it, after a mid-epoch resume), copied off the loader's buffers."""
    loader.set_epoch(epoch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def killed_after(loader, epoch: int, steps: int) -> dict:
    """The loader's state after `steps` batches of epoch `epoch`, as a run killed there checkpoints it."""
    loader.set_epoch(epoch)
    batches = iter(loader)
    for _ in range(steps):
        next(batches)
    return loader.state_dict()


def assert_bit_identical(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for step, ((x, y), (ex, ey)) in enumerate(zip(got, expected)):
        assert x.shape == ex.shape and torch.equal(y, ey), f"batch {step}: {tuple(x.shape)} vs {tuple(ex.shape)}"
        assert torch.equal(x, ex), f"batch {step}: pixels differ, max {(x.float() - ex.float()).abs().max().item()}"


@pytest.mark.parametrize("hw_decoder_load", [0.0, 0.65])
def test_dali_gpu_mid_epoch_resume_is_bit_identical(gpu_data, hw_decoder_load):
    """A run killed mid-epoch and resumed from the loader's state_dict gets the very batches the uninterrupted
    run would have had: the reader's order, the fused random crops, flips and colour jitter, decoded on the GPU.
    Per decoder: 0.0 sends every JPEG to the CUDA decoder, 0.65 (the default) most baseline ones to the hardware
    decoder (A100, H100, H200; elsewhere the same as 0.0), so a failure names the decoder that broke it."""
    make = lambda: gpu_loader("train", gpu_data, seed=3, hw_decoder_load=hw_decoder_load)  # noqa: E731
    reference = make()
    epochs = [epoch_of(reference, e) for e in range(3)]  # 6 batches an epoch
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])  # a new order and new crops each epoch
    first = make()
    epoch_of(first, 0)
    state = killed_after(first, 1, steps=2)
    del first
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    assert_bit_identical(epoch_of(resumed, 1) + epoch_of(resumed, 2), epochs[1][2:] + epochs[2])


@pytest.mark.parametrize("killed_in", [0, 1])
def test_dali_gpu_progressive_resizing_rebuilds_at_the_new_size_and_resumes_exactly(gpu_data, killed_in):
    """Progressive resizing rebuilds the GPU pipeline at each new size (set_epoch), continuing from the old one's
    checkpoint: the new shape from the epoch it starts, and a resume from either side of a change (the
    resumed loader crossing the change itself, or rebuilt straight at the new size) stays bit-identical."""
    aug = Augmentation(min_res=32, max_res=96, start_ramp=0, end_ramp=2)
    sizes = aug.train_sizes(3)
    assert sizes == [32, 64, 96]
    make = lambda: gpu_loader("train", gpu_data, augmentation=aug, seed=5)  # noqa: E731
    reference = make()
    epochs = []
    for epoch, size in enumerate(sizes):
        epochs.append(epoch_of(reference, epoch))
        assert reference.image_size == size
        for images, labels in epochs[-1]:
            assert images.is_cuda and images.dtype == torch.float16 and images.shape == (8, 3, size, size)
            assert images.is_contiguous(memory_format=torch.channels_last) and labels.shape == (8,)
    first = make()
    for epoch in range(killed_in):
        epoch_of(first, epoch)
    state = killed_after(first, killed_in, steps=2)
    del first
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.image_size == sizes[killed_in]
    rest = [batch for epoch in range(killed_in, 3) for batch in epoch_of(resumed, epoch)]
    assert resumed.image_size == sizes[-1]
    assert_bit_identical(rest, epochs[killed_in][2:] + [b for e in epochs[killed_in + 1:] for b in e])


def test_amp_fp16_channels_last_step_on_the_gpu(gpu_data):
    env = DistEnv(0, 1, 0, torch.device("cuda", 0))
    parts = build_training(with_fields(arch="resnet50", batch_size=8), CLASSES, env)
    assert parts.amp_dtype == torch.float16 and parts.scaler.is_enabled()
    conv = parts.raw_model.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    losses = []
    for images, labels in gpu_loader("train", gpu_data):
        assert images.dtype == torch.float16  # the AMP step is fed the fp16 batches training gives it
        for group in parts.optimizer.param_groups:
            group["lr"] = 0.01
        losses.append(train_step(parts, images, labels))
    losses = torch.stack(losses).float()
    assert torch.isfinite(losses).all()



class OneRankDdp(DistEnv):
    """Rank 0 of an NCCL group of one, seen as distributed: build_training wraps the model in DDP on the capture
    stream, as it does for 2+ ranks, on a machine with one GPU (DistEnv says distributed only from 2 ranks up)."""

    @property
    def distributed(self) -> bool:
        return True


def cuda_graphs_under_nccl_ddp(store: str) -> None:
    """The body of test_cuda_graphs_capture_and_capture_again_under_nccl_ddp, run in a process of its own: a
    capture that fails can leave a process's CUDA context unusable, and the NCCL group must not outlive it."""
    import torch.distributed as dist

    from test_graphs import gpu_batches, one_step_from_equal_states

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", store=dist.FileStore(store, 1), rank=0, world_size=1, device_id=device)
    try:
        env = OneRankDdp(0, 1, 0, device)
        for machine in ({}, {"ddp_fp16_compress": True}):  # check_capturable accepts the comm hook: capture it
            recipe = with_fields(arch="resnet18", batch_size=8)  # AMP fp16, GradScaler, fused SGD
            eager = build_training(recipe, CLASSES, env, Machine(**machine))
            graphed = build_training(recipe, CLASSES, env, Machine(cuda_graphs=True, **machine))
            assert all(isinstance(parts.model, DistributedDataParallel) for parts in (eager, graphed))
            step = graphed.graphed
            assert step is not None and step.warmup_steps == WARMUP_STEPS_DDP
            # DDP's 11 eager steps, the capture step, two replays; then a new size: WARMUP_STEPS eager steps at
            # it (DDP is warm by then), the capture step, one replay
            first, second = WARMUP_STEPS_DDP + 3, WARMUP_STEPS + 2
            batches = gpu_batches(first, torch.float16) + gpu_batches(second, torch.float16, size=48, seed=1)
            for i, (images, labels) in enumerate(batches):
                # a new LR every step (the graph must read each one); one step from equal states, at 1e-2:
                # test_graphs.one_step_from_equal_states says why (fp16, and an all-reduce over one rank adds none)
                one_step_from_equal_states(eager, graphed, images, labels, 0.01 * (1 + i % 3), 1e-2, seed=i)
                since = i - first  # calls since the size changed
                assert step.captured == (i >= WARMUP_STEPS_DDP if since < 0 else since >= WARMUP_STEPS), (machine, i)
                captures = 0 if i < WARMUP_STEPS_DDP else 1 if i < first + WARMUP_STEPS else 2
                assert step.captures == captures, (machine, i)
            assert step.capture_s > 0 and tuple(step.static_images.shape) == (8, 3, 48, 48)
            print(f"{machine or 'default'}: captured at 32 px after {WARMUP_STEPS_DDP} DDP steps, again at 48 px; "
                  f"every step followed the eager one", flush=True)
            del eager, graphed, step
            gc.collect()  # the graphs (and their NCCL work) go before the group does
            torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_cuda_graphs_capture_and_capture_again_under_nccl_ddp(tmp_path):
    """--cuda-graphs under DDP on NCCL (torch's recipe: DDP built on the side stream, 11 eager DDP steps, the
    all-reduce inside the capture), on one GPU: a group of one rank over NCCL with a file store. The graphed step
    captures, captures again at a new image size, and every call follows the eager DDP step from equal states."""
    here = Path(__file__).resolve().parent  # this module; test_graphs in tests/component; conftest in tests/
    path = os.pathsep.join(dict.fromkeys(filter(None, [str(ROOT), str(here), str(ROOT / "tests" / "component"),
                                                       str(ROOT / "tests"),
                                                       os.environ.get("PYTHONPATH", "")])))
    code = "import sys; from test_gpu import cuda_graphs_under_nccl_ddp as check; check(sys.argv[1])"
    done = run_cli([sys.executable, "-c", code, str(tmp_path / "store")], timeout=300, PYTHONPATH=path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert done.stdout.count("every step followed the eager one") == 2, done.stdout


def gpu_run(data, tmp_path, nproc, extra):
    out = tmp_path / "run"
    done = run_cli(torchrun(nproc, "-m", "rn50.train", "--data", str(data), "--out", str(out),
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
def test_one_process_run_with_the_gpu_pipeline(gpu_data, tmp_path, extra):
    gpu_run(gpu_data, tmp_path, 1, extra)  # passes on one GPU: what it checks needs no second one


@pytest.mark.slow
@pytest.mark.parametrize("extra", EXTRAS)
def test_nccl_ddp_run_with_the_gpu_pipeline(gpu_data, tmp_path, extra):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL across ranks needs 2 GPUs (one process per GPU)")
    gpu_run(gpu_data, tmp_path, gpu_ddp_processes(torch.cuda.device_count()), extra)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dali-hybrid", "torchvision-gpu"])
def test_training_runs_with_the_other_gpu_loaders(gpu_data, tmp_path, kind):
    nproc = gpu_ddp_processes(torch.cuda.device_count())
    out = tmp_path / "run"
    done = run_cli(torchrun(nproc, "-m", "rn50.train", "--data", str(gpu_data), "--out", str(out),
                            "--loader", kind, "--epochs", "1", "--batch-size", "8", "--image-size", "64",
                            "--arch", "resnet18", "--workers", "2", "--dali-threads", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["val/count"] == N_VAL_IMAGES and summary["ddp/replicas_identical"] is True


def test_gpu_timeline_stall_of_a_loader_that_sleeps():
    """A 20 ms input wait against ~8 ms of GPU work per step: the GPU idles ~12 of every ~20 ms."""
    from benchmarks.measure import Bench
    from benchmarks.plan import Plan

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
def test_harness_full_report_on_the_gpu(gpu_data, tmp_path):
    """Every loader by default, all modes: MFU from the peak table, stall on the GPU timeline, NVML telemetry,
    each loader against DALI and the answer to "which loader here"."""
    from benchmarks.run import main as bench

    loaders = ("dali", "dali-hybrid", "dali-cpu", "torchvision-gpu", "torchvision")
    out = tmp_path / "bench"
    bench(["--data", str(gpu_data), "--out", str(out),
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
