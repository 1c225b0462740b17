"""Issue 17: image formats beyond JPEG, raw ImageNet's odd files through the CPU loaders without a scan, and
the live progress on rank 0's step line."""

from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from pipelines import build_loader
from pipelines.baseline import to_rgb
from pipelines.errors import UserError
from pipelines.folder import check_files, list_split
from pipelines.jpeg_check import decodes_by_content, header_problem

from conftest import N_TRAIN_IMAGES, N_VAL_IMAGES, run_cli

ACCEPTANCE = ["--workers", "1", "--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--epochs", "1",
              "--seed", "1", "--dali-threads", "1"]
STEP_LINE = re.compile(
    r"^epoch 1 step (\d+)/(\d+) lr \S+ loss \S+ \| ([\d.]+) img/s, input wait (\d+)%, "
    r"eta epoch (\d+:\d\d) run (\d+:\d\d)(, peak mem [\d.]+ GiB)?$", re.M)


def with_odd_files(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    c = data / "train" / "n00000001"
    Image.new("RGB", (320, 300), (9, 99, 199)).save(c / "png_inside.JPEG", format="PNG")
    Image.new("CMYK", (320, 300), (9, 99, 199, 0)).save(c / "cmyk.JPEG", format="JPEG")
    return data


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


def test_the_gpu_loader_and_undecodable_files_still_stop(data_dir, tmp_path):
    data = with_odd_files(data_dir, tmp_path)
    train = list_split(str(data), "train")
    with pytest.raises(UserError, match="cannot be trained on .* and 1 more"):  # --loader dali: unverified
        check_files(train, 0, 1, "dali")
    check_files(train, 0, 1, "dali-cpu")  # reported, not stopped
    (data / "train" / "n00000000" / "empty.JPEG").write_bytes(b"")
    (data / "val" / "n00000002" / "page.JPEG").write_text("<html>404</html>\n")
    list_split.cache_clear()
    for split in ("train", "val"):  # the odd files do not count among the bad ones: 1 in train, 1 in val
        with pytest.raises(UserError, match=r"and 1 more \(2 bad files: 1 in train, 1 in val\)"):
            check_files(list_split(str(data), split), 0, 1, "torchvision")


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


def write_formats(folder):
    """Every kind the loaders read, as the issue lists them: PNG (RGB, RGBA, LA, palette, 16-bit gray),
    BMP, TIFF (also 16-bit), WebP (also with alpha), upper-case suffixes too."""
    rgb = Image.new("RGB", (40, 36), (9, 99, 199))
    gray16 = Image.fromarray(np.full((36, 40), 40000, np.uint16))
    folder.mkdir(parents=True)
    rgb.save(folder / "rgb.png")
    Image.new("RGBA", (40, 36), (9, 99, 199, 128)).save(folder / "rgba.PNG")
    Image.new("LA", (40, 36), (100, 128)).save(folder / "la.png")
    rgb.convert("P").save(folder / "palette.png")
    gray16.save(folder / "gray16.png")
    rgb.save(folder / "rgb.BMP")
    rgb.save(folder / "rgb.tif")
    gray16.save(folder / "gray16.tiff")
    rgb.save(folder / "rgb.webp", lossless=True)
    Image.new("RGBA", (40, 36), (9, 99, 199, 128)).save(folder / "rgba.WebP", lossless=True)


def test_every_format_passes_the_check_and_pil_reads_it_as_dali_does(tmp_path):
    write_formats(tmp_path / "f")
    files = sorted((tmp_path / "f").iterdir())
    assert [header_problem(p) for p in files] == [None] * len(files)
    for p in files:
        with Image.open(p) as im:
            pixel = to_rgb(im).getpixel((0, 0))
        # 16-bit 40000 scales to 156 (DALI's CPU decoder gives 156 too), not PIL's clipped 255; alpha dropped
        expected = {"gray16": (156,) * 3, "la": (100,) * 3, "palette": (0, 102, 204)}.get(p.stem, (9, 99, 199))
        assert pixel == expected, p.name
    png = tmp_path / "f" / "rgb.png"
    png.write_bytes(png.read_bytes()[:-20])
    assert header_problem(png).startswith("truncated")
    assert decodes_by_content("CMYK JPEG (4 colour components)") and decodes_by_content("PNG data behind a JPEG name")
    assert not decodes_by_content("GIF data behind a JPEG name") and not decodes_by_content("zero bytes")


@pytest.mark.parametrize("kind", ["dali-cpu", "torchvision"])
def test_both_cpu_loaders_read_every_format(tmp_path, kind):
    for split in ("train", "val"):
        write_formats(tmp_path / "d" / split / "a")
        write_formats(tmp_path / "d" / split / "b")
    loader = build_loader(kind, "val", tmp_path / "d", batch_size=4, image_size=32, workers=1, dali_threads=1)
    seen = sum(len(labels) for _, labels in loader)
    assert seen == 20 == loader.num_samples
