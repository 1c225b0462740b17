"""tools.make_dataset: layout, real baseline JPEGs, determinism, photo-like size, errors, learnable classes."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from rn50.config.errors import UserError
from tools.make_dataset import main, make_dataset
from tools.photo_like import ASPECTS

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(min_side=48, max_side=64)  # decode-cost realism is not under test here: keep it quick


def files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.JPEG"))


def test_layout_and_counts(tmp_path):
    counts = make_dataset(tmp_path, 3, 4, 2, seed=0, workers=2, **SMALL)
    assert counts["classes"] == 3 and counts["train"] == 12 and counts["val"] == 6
    for split, per_class in (("train", 4), ("val", 2)):
        classes = sorted(p.name for p in (tmp_path / split).iterdir())
        assert classes == ["n00000000", "n00000001", "n00000002"]  # sorted order == class index
        for name in classes:
            assert len(list((tmp_path / split / name).glob("*.JPEG"))) == per_class
    assert (tmp_path / "train" / "n00000001" / "n00000001_3.JPEG").is_file()
    assert (tmp_path / "val" / "n00000002" / "val_n00000002_1.JPEG").is_file()
    assert counts["bytes"] == sum(p.stat().st_size for p in files(tmp_path))


def test_files_are_baseline_420_rgb_jpegs_with_photo_like_shapes(tmp_path):
    make_dataset(tmp_path, 2, 10, 2, seed=1, workers=2, **SMALL)
    aspects = set()
    for path in files(tmp_path):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert not im.info.get("progressive") and not im.info.get("progression")
            assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
            assert 48 <= min(im.size) <= 64 and max(im.size) <= 2 * 64 + 1
            im.load()  # decodes fully
            aspects.add(round(max(im.size) / min(im.size), 2))
    assert len(aspects) >= 2


def test_same_seed_same_bytes_whatever_the_workers_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_dataset(a, 2, 3, 2, seed=5, workers=1, **SMALL)
    make_dataset(b, 2, 3, 2, seed=5, workers=2, **SMALL)
    make_dataset(c, 2, 3, 2, seed=6, workers=2, **SMALL)
    fa, fb, fc = files(a), files(b), files(c)
    assert [p.relative_to(a) for p in fa] == [p.relative_to(b) for p in fb] == [p.relative_to(c) for p in fc]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
    assert not any(x.read_bytes() == z.read_bytes() for x, z in zip(fa, fc))
    # Per-image randomness: no two images of one class are the same.
    assert len({p.read_bytes() for p in fa}) == len(fa)


def test_default_size_images_have_photo_like_file_sizes(tmp_path):
    make_dataset(tmp_path, 1, 3, 1, seed=0, workers=2)
    for path in files(tmp_path):
        size = path.stat().st_size
        with Image.open(path) as im:
            assert 300 <= min(im.size) <= 500
            bits_per_pixel = 8 * size / (im.width * im.height)
        # ImageNet: ~110 KB per image, a few bits per pixel; flat colours would be a few KB.
        assert 20_000 <= size <= 250_000, size
        assert 2.0 <= bits_per_pixel <= 8.0, bits_per_pixel


def test_main_prints_a_summary(tmp_path, capsys):
    main(["--out", str(tmp_path), "--classes", "2", "--train-per-class", "2", "--val-per-class", "1",
          "--seed", "0", "--min-side", "32", "--max-side", "40", "--workers", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "4 train" in out[0] and "2 val" in out[0] and "MB" in out[0]


@pytest.mark.parametrize("kwargs", [
    dict(classes=0), dict(train_per_class=0), dict(val_per_class=0), dict(seed=-1),
    dict(min_side=15, max_side=20), dict(min_side=64, max_side=48), dict(workers=0),
])
def test_bad_arguments_are_user_errors(tmp_path, kwargs):
    args = dict(out=tmp_path, classes=2, train_per_class=1, val_per_class=1, seed=0, **SMALL) | kwargs
    with pytest.raises(UserError):
        make_dataset(**args)
    assert not (tmp_path / "train").exists()  # nothing written before validation


def test_cli_refuses_a_non_empty_output_with_exit_code_2(tmp_path):
    (tmp_path / "train" / "n00000000").mkdir(parents=True)
    cmd = [sys.executable, "-m", "tools.make_dataset", "--out", str(tmp_path), "--classes", "2",
           "--train-per-class", "1", "--val-per-class", "1", "--seed", "0", "--min-side", "32", "--max-side", "32"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "not empty" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "train").iterdir()) == [tmp_path / "train" / "n00000000"]  # left untouched


def augmented_hue_feature(path: Path, rng: np.random.Generator) -> np.ndarray:
    """Mean hue (as a unit vector) of a training-style view: random crop of 8-100% of the area,
    flip, brightness/contrast/saturation jitter of +-0.4, downsampled to 32 px."""
    with Image.open(path) as im:
        w, h = im.size
        area = rng.uniform(0.08, 1.0) * w * h
        cw, ch = min(w, max(8, round(np.sqrt(area)))), min(h, max(8, round(np.sqrt(area))))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        rgb = np.asarray(im.crop((x, y, x + cw, y + ch)).resize((32, 32), Image.Resampling.BILINEAR), np.float32)
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]
    b, c, s = rng.uniform(0.6, 1.4, size=3)
    rgb = rgb * b
    rgb = rgb.mean() + c * (rgb - rgb.mean())
    grey = rgb @ np.float32([0.299, 0.587, 0.114])
    rgb = grey[..., None] + s * (rgb - grey[..., None])
    view = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    hsv = np.asarray(view.convert("HSV"), np.float32) / 255.0
    angle, weight = 2 * np.pi * hsv[..., 0], hsv[..., 1] * hsv[..., 2]  # grey/dark pixels have no hue
    v = np.array([(weight * np.cos(angle)).sum(), (weight * np.sin(angle)).sum()])
    return v / (np.linalg.norm(v) + 1e-9)


def test_classes_separate_by_hue_after_training_style_augmentation(tmp_path):
    classes = 8
    make_dataset(tmp_path, classes, 6, 5, seed=3, workers=2, **SMALL)
    rng = np.random.default_rng(0)

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        paths = files(tmp_path / split)
        labels = np.array([int(p.parent.name[1:]) for p in paths])
        return np.stack([augmented_hue_feature(p, rng) for p in paths]), labels

    x_train, y_train = features("train")
    x_val, y_val = features("val")
    centroids = np.stack([x_train[y_train == k].mean(axis=0) for k in range(classes)])
    predicted = np.argmax(x_val @ centroids.T, axis=1)
    assert (predicted == y_val).mean() > 0.9


def quality_of(im: Image.Image) -> int | None:
    """The PIL quality whose quantisation tables the file carries (None: none of 1..100)."""
    for quality in range(1, 101):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "JPEG", quality=quality, subsampling=2)
        if Image.open(buf).quantization == im.quantization:
            return quality
    return None


def test_photo_like_mode_has_imagenets_sizes_qualities_and_bytes_per_pixel_and_is_seeded(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_dataset(a, 2, 6, 1, seed=3, workers=2, photo_like=True)
    make_dataset(b, 2, 6, 1, seed=3, workers=1, photo_like=True)
    make_dataset(c, 2, 6, 1, seed=4, workers=2, photo_like=True)
    fa, fb, fc = files(a), files(b), files(c)
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb)) and len(fa) == 14
    assert not any(x.read_bytes() == z.read_bytes() for x, z in zip(fa, fc))
    per_pixel, portrait, framed = [], 0, 0
    for path in fa:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and not im.info.get("progressive")
            assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0, as most ImageNet files
            assert 85 <= quality_of(im) <= 95
            assert 300 <= min(im.size) <= 500 and max(im.size) / min(im.size) <= 2.0 + 1e-2
            per_pixel.append(path.stat().st_size / (im.width * im.height))
            portrait += im.height > im.width
            # a camera's frame (4:3, 3:2, 16:9, ...) to the pixel, not any ratio
            framed += any(abs(max(im.size) - min(im.size) * ratio) <= 1 for ratio, _ in ASPECTS)
    # ImageNet's photos: ~110 KB at ~470x390, about 0.6 B/px. Measured over 200 of these images: 0.42-0.90 B/px
    # each, mean 0.62; the mean of 14 lies within about +-0.05 of it, so the bounds leave room on both sides.
    assert all(0.3 <= v <= 1.1 for v in per_pixel), per_pixel
    assert 0.5 <= float(np.mean(per_pixel)) <= 0.75, np.mean(per_pixel)
    assert portrait < len(fa) / 2 and framed >= len(fa) * 3 / 4  # mostly landscape; frames clipped at 300 px aside
