"""Shared fixtures: one small generated dataset per session, real DALI CPU operators, no network; the tiers (each
folder marks its tests) and the shared tiny runs (docs/testing.md). Imports torch, pytest and the standard library
alone at the top, so tests/gpu imports with torch, torchvision, numpy, pillow, pytest and DALI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# 4 classes; 48 training images; 44 validation images: not divisible by 2 ranks x batch 8
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 12, 11
N_TRAIN_IMAGES, N_VAL_IMAGES = CLASSES * TRAIN_PER_CLASS, CLASSES * VAL_PER_CLASS


TIERS = ("unit", "component", "e2e")  # tests/<tier>/: the folder is the tier (setup.cfg's markers say what each is)


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in TIERS:
            item.add_marker(getattr(pytest.mark, folder))
        elif folder == "gpu":  # tests/gpu/: needs CUDA, whatever its own marks say
            item.add_marker(pytest.mark.gpu)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    from tools.make_dataset import make_dataset  # here, not at the top: tests/gpu imports need torch, not tqdm

    out = tmp_path_factory.mktemp("data") / "imagenet-like"
    make_dataset(out, CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, seed=7, min_side=48, max_side=64)
    return out


def with_odd_files(data_dir: Path, tmp_path: Path) -> Path:
    """A copy of the generated data with two files raw ImageNet holds in train/: a PNG and a CMYK JPEG, each
    behind a .JPEG name (issue 17)."""
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    c = data / "train" / "n00000001"
    Image.new("RGB", (320, 300), (9, 99, 199)).save(c / "png_inside.JPEG", format="PNG")
    Image.new("CMYK", (320, 300), (9, 99, 199, 0)).save(c / "cmyk.JPEG", format="JPEG")
    return data


def run_cli(args: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """Run a command of ours (`-m module ...` or torchrun) from the project root, one thread per process
    so that two processes share two cores without oversubscription."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


# --- the shared tiny run ---------------------------------------------------------------------------------
# One real `python -m rn50.train` per session that many e2e assertions read instead of each starting its own
# (issue 25): resnet18 at 32 px on the generated data, 2 epochs of 6 steps, a checkpoint every 2 steps (two
# mid-epoch ones in each epoch), the last 4 kept, started with `--resume auto` on an empty folder. It is read-only:
# a test that writes into a run folder copies it first (shared_run.copy_to).
SHARED_RUN_FLAGS = ["--epochs", "2", "--checkpoint-every", "2", "--keep-checkpoints", "4", "--loader", "dali-cpu",
                    "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--dali-threads", "1",
                    "--warmup-epochs", "1", "--lr-milestones", "2", "--seed", "3", "--log-every", "1"]


@dataclass(frozen=True)
class SharedRun:
    dir: Path  # the run folder (--out)
    args: list[str]  # its command without --out and --resume: run it again with other flags, same recipe
    done: subprocess.CompletedProcess  # its exit code, stdout and stderr

    def copy_to(self, dest: Path) -> Path:
        import shutil

        shutil.copytree(self.dir, dest)
        return dest


@pytest.fixture(scope="session")
def shared_run(data_dir, tmp_path_factory) -> SharedRun:
    args = [sys.executable, "-m", "rn50.train", "--data", str(data_dir), *SHARED_RUN_FLAGS]
    out = tmp_path_factory.mktemp("shared-run") / "run"
    done = run_cli([*args, "--out", str(out), "--resume", "auto"], timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return SharedRun(out, args, done)


@pytest.fixture(scope="session")
def shared_ddp_run(data_dir, tmp_path_factory) -> SharedRun:
    """The same flags on two ranks through torchrun (real gloo DDP), base LR 0.4 (peak 0.4 x 16 / 256): 3 steps
    per epoch, so checkpoints at steps 2, 3 (epoch 1's end), 4 and 6 (epoch 2's end)."""
    args = torchrun(2, "-m", "rn50.train", "--data", str(data_dir), *SHARED_RUN_FLAGS, "--base-lr", "0.4")
    out = tmp_path_factory.mktemp("shared-ddp-run") / "run"
    done = run_cli([*args, "--out", str(out)], timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return SharedRun(out, args, done)


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def gpu_ddp_processes(gpus: int) -> int:
    """Processes for the NCCL test: two when there are two GPUs (NCCL across ranks; one process per GPU),
    never more, so its 48 training images keep a batch of 8 on every rank whatever the GPU count."""
    return max(1, min(gpus, 2))


class SleepyLoader:
    """Yields a batch after sleeping `delay` seconds: an input pipeline of known cost (the harness's stall
    tests, on the CPU and on the GPU timeline)."""

    def __init__(self, delay, batch=4, steps=50):
        self.delay, self.batch, self.steps = delay, batch, steps

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for _ in range(self.steps):
            time.sleep(self.delay)
            yield torch.zeros(self.batch, 3, 2, 2), torch.zeros(self.batch, dtype=torch.long)
