"""DALI's memory in the figures (issue 36.2): a DALI batch is DALI's own buffer, which torch's allocator neither
made nor counts, and which later batches leave alone; the harness hands DALI's free pool blocks back after each
row, once the row's pipeline is garbage; the NVML telemetry keeps the device memory's peak beside its mean; the
CPU pipeline has glibc keep the buffers DALI frees each batch (keep_freed_memory)."""

from __future__ import annotations

import ctypes
import gc
import resource
import weakref

import pytest
import torch

import pipelines.dali
from benchmarks.measure import Bench
from benchmarks.plan import Plan
from pipelines.settings import keep_freed_memory
from rn50.config.machine import Machine
from rn50.config.recipe import with_fields
from rn50.core.loaders import build_split
from rn50.system.dist import DistEnv
from rn50.system.telemetry import summary

RECIPE = with_fields(arch="resnet18", batch_size=4, image_size=32)
CPU = DistEnv(0, 1, 0, torch.device("cpu"))


def test_a_dali_batch_is_a_view_of_dalis_own_buffer_not_a_copy_torch_allocated(data_dir, monkeypatch):
    """DALI 2.4's default executor (exec_dynamic) hands its outputs to torch through DLPack, without a copy, so
    torch's memory figures (max_memory_allocated on a GPU) never count DALI's buffers."""
    handed_over, from_dlpack = [], torch.from_dlpack

    def spy(tensor, *args, **kwargs):  # DALI's plugin calls torch.from_dlpack with its TensorCPU / TensorGPU
        handed_over.append(tensor.data_ptr())
        return from_dlpack(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "from_dlpack", spy)
    batches = iter(build_split(RECIPE, Machine(dali_threads=1), "dali-cpu", "train", data_dir, CPU))
    images, _ = next(batches)
    assert images.data_ptr() in handed_over  # the NHWC -> NCHW permute is a view of DALI's buffer
    # and torch did not allocate that storage: its allocator's storages are resizable, a DLPack import's is not
    assert torch.empty(1).untyped_storage().resizable() and not images.untyped_storage().resizable()
    # A held batch stays as delivered while later ones are made: DALI copies its python step's output before the
    # step runs again, so pipelines.dali_host.HostSteps reuses one output block from batch to batch
    held = images.clone()
    later = [next(batches)[0] for _ in range(3)]
    assert torch.equal(images, held) and not any(torch.equal(images, batch) for batch in later)


def test_the_harness_releases_dalis_free_memory_after_a_row_once_the_rows_pipeline_is_garbage(data_dir,
                                                                                                 monkeypatch):
    pipes, released = [], []
    real_loader = Bench.loader

    def loader(self, kind, **overrides):
        built = real_loader(self, kind, **overrides)
        # a cycle: with the collector off, only release_memory's gc.collect() frees the loader and its pipeline,
        # so the release finds the pipeline dead only if it comes after that collection
        built.itself = built
        pipes.append(weakref.ref(built._iterator._pipes[0]))
        return built

    monkeypatch.setattr(Bench, "loader", loader)
    monkeypatch.setattr(pipelines.dali, "release_unused_memory",
                        lambda: released.append([pipe() is None for pipe in pipes]))
    bench = Bench(RECIPE, data_dir, CPU, Plan(("loader",), ("dali-cpu",), 1, 2, 1), Machine(dali_threads=1))
    gc.disable()
    try:
        row = bench.measure("loader", "dali-cpu")
    finally:
        gc.enable()
    assert released == [[True]]  # once, after the row, its pipeline already gone
    assert row["memory_peak_gib"] is None and row["memory_device_peak_gib"] is None  # the CPU: neither is known


def test_the_telemetry_keeps_the_device_memorys_peak_beside_its_mean():
    samples = [{"memory_used_gib": 3.0, "gpu_util_pct": 90.0}, {"memory_used_gib": 7.5},
               {"memory_used_gib": 4.5, "pcie_rx_mb_s": 12.0}]
    figures = summary(samples)
    assert figures["memory_used_peak_gib"] == 7.5  # the largest sample, not the last
    assert figures["memory_used_gib"] == pytest.approx(5.0)
    assert figures["gpu_util_pct"] == 90.0 and figures["pcie_rx_mb_s"] == 12.0 and figures["power_w"] is None
    assert summary([{"gpu_util_pct": 50.0}])["memory_used_peak_gib"] is None  # no sample read the memory
    assert summary([])["memory_used_peak_gib"] is None


def test_keep_freed_memory_hands_a_freed_batch_sized_block_back_without_page_faults():
    """pipelines.settings.keep_freed_memory: a 40 MB block freed and allocated again comes back from malloc's heap,
    its pages still there. glibc's default maps a block that large afresh each time and unmaps it on free (10,241
    page faults to touch it, measured with the setting broken)."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 40 << 20

    def touch_fresh_block() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert keep_freed_memory()
    touch_fresh_block()  # the heap grows to hold it once
    assert touch_fresh_block() < size // 4096 // 10


def test_the_cpu_pipeline_keeps_freed_memory_before_its_threads_start(data_dir, monkeypatch):
    """The dali-cpu loader sets keep_freed_memory before it builds its pipeline, whose threads take their malloc
    arenas at their first allocation."""
    calls = []
    real_build = pipelines.dali.DaliLoader._build
    monkeypatch.setattr(pipelines.dali, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(pipelines.dali.DaliLoader, "_build", lambda self, checkpoint: (calls.append("build"),
                                                                                       real_build(self, checkpoint)))
    build_split(RECIPE, Machine(dali_threads=1), "dali-cpu", "train", data_dir, CPU)
    assert calls == ["keep", "build"]
