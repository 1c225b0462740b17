"""Issue 17, the training command on odd files: CMYK and PNG behind a .JPEG name train with the CPU loaders, PNG
class folders train with dali-cpu, and rank 0's step line shows the live progress (moved from
tests/component/test_progress_and_formats.py: these run `python -m rn50.train`)."""

from __future__ import annotations

import json
import re
import sys

import pytest
from PIL import Image

from conftest import N_TRAIN_IMAGES, N_VAL_IMAGES, run_cli, with_odd_files

ACCEPTANCE = ["--workers", "1", "--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--epochs", "1",
              "--seed", "1", "--dali-threads", "1"]
STEP_LINE = re.compile(
    r"^epoch 1 step (\d+)/(\d+) lr \S+ loss \S+ \| ([\d.]+) img/s, input wait (\d+)%, "
    r"eta epoch (\d+:\d\d) run (\d+:\d\d)(, peak mem [\d.]+ GiB \(torch\))?$", re.M)


@pytest.mark.parametrize("loader", ["dali-cpu", "torchvision"])
def test_cmyk_and_png_behind_a_jpeg_name_train_with_the_cpu_loaders(data_dir, tmp_path, loader):
    data = with_odd_files(data_dir, tmp_path)
    out = tmp_path / "run"
    ran = run_cli([sys.executable, "-m", "rn50.train", "--data", str(data), "--out", str(out), "--loader", loader,
                   *ACCEPTANCE])
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "train: 2 files decode by content: 1 CMYK JPEG, 1 PNG behind a .JPEG name" in ran.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["train_images"] == N_TRAIN_IMAGES + 2
    assert summary["final"]["val/count"] == N_VAL_IMAGES


def test_png_class_folders_train_with_dali_cpu_and_the_step_line_shows_progress(data_dir, tmp_path):
    data = tmp_path / "png"
    for path in data_dir.rglob("*.JPEG"):
        dest = data / path.relative_to(data_dir).with_suffix(".png")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:
            im.save(dest, format="PNG")
    out = tmp_path / "run"
    ran = run_cli([sys.executable, "-m", "rn50.train", "--data", str(data), "--out", str(out), "--loader",
                   "dali-cpu", *ACCEPTANCE, "--log-every", "3"])
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "decode by content" not in ran.stderr  # PNG under its own name is not odd
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["train_images"] == N_TRAIN_IMAGES
    assert summary["final"]["val/count"] == N_VAL_IMAGES
    lines = STEP_LINE.findall(ran.stdout)
    assert [int(step) for step, *_ in lines] == [3, 6, 9, 12], ran.stdout
    for step, spe, img_s, wait, eta_epoch, eta_run, peak in lines:
        assert int(spe) == N_TRAIN_IMAGES // 4 and float(img_s) > 0 and 0 <= int(wait) <= 100
        assert eta_epoch == eta_run  # one epoch: the run ends with it
        assert peak == ""  # no CUDA here
    assert lines[-1][4] == "0:00"  # the epoch's last step
