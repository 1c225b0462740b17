"""Issue 17: image formats beyond JPEG, and raw ImageNet's odd files through the CPU loaders without a scan (the
training runs on them and rank 0's live step line: tests/e2e/test_formats_cli.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines import build_loader
from pipelines.images import to_rgb
from pipelines.errors import UserError
from pipelines.folder import check_files, list_split
from pipelines.registry import REGISTRY
from pipelines.jpeg_check import decodes_by_content, header_problem

from conftest import with_odd_files


def test_the_gpu_loader_and_undecodable_files_still_stop(data_dir, tmp_path):
    data = with_odd_files(data_dir, tmp_path)
    train = list_split(str(data), "train")
    with pytest.raises(UserError, match="cannot be trained on .* and 1 more"):  # --loader dali: unverified
        check_files(train, 0, 1, REGISTRY["dali"].decodes_by_content)
    check_files(train, 0, 1, REGISTRY["dali-cpu"].decodes_by_content)  # reported, not stopped
    (data / "train" / "n00000000" / "empty.JPEG").write_bytes(b"")
    (data / "val" / "n00000002" / "page.JPEG").write_text("<html>404</html>\n")
    list_split.cache_clear()
    for split in ("train", "val"):  # the odd files do not count among the bad ones: 1 in train, 1 in val
        with pytest.raises(UserError, match=r"and 1 more \(2 bad files: 1 in train, 1 in val\)"):
            check_files(list_split(str(data), split), 0, 1, REGISTRY["torchvision"].decodes_by_content)


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
