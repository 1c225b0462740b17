"""Write a small procedural ImageNet-like JPEG data set (no downloads).

Layout: OUT/train/<wnid>/<wnid>_<i>.JPEG and OUT/val/<wnid>/val_<wnid>_<i>.JPEG,
with wnids n00000000, n00000001, ... so that sorted folder order == class index.

The images are built to stand in for ImageNet in throughput work and smoke training:
- decode cost like ImageNet's: real baseline 4:2:0 RGB JPEGs, shorter side in
  [min_side, max_side], photo-like aspect ratios, quality 85-95, and textured content
  whose compressed size per pixel is photo-like;
- learnable through RandomResizedCrop + flip + brightness/contrast/saturation jitter:
  each class owns a hue (jitter does not change hue) and a stripe orientation and
  frequency, both present everywhere in the image so that any crop carries them.
  Hue is stored in 8 bits, so it separates classes cleanly only up to ~100 classes;
  beyond that neighbouring classes differ by stripes alone (24 combinations).

--photo-like renders photographs' statistics instead (tools/photo_like.py: occluding
shapes, 1/f colour noise, textures, sensor grain, ImageNet's frame sizes), so that JPEG
decoding costs what it costs on real photos: the loader shootout's data
(benchmarks/shootout.py). Its classes lean to a hue, but learning is not its purpose.

Every image's RNG is derived from (seed, split, class, index), so output is
byte-identical for the same arguments whatever the worker count or order.

    python -m tools.make_dataset --out DIR --classes C --train-per-class N \
        --val-per-class M --seed S [--min-side 300 --max-side 500] [--workers K] [--photo-like]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rn50.config.errors import UserError
from tools.photo_like import photo_size, render_photo
from tools.progress import bar as progress_bar

# Texture strengths, tuned so default-size images average ~100-110 KB (~4 bits/pixel),
# like ImageNet's ~110 KB per image: per-pixel grain (sigma, on a 0..1 scale) is what
# JPEG pays for most, so it sets the file size and with it the entropy-decoding cost.
VALUE_GRAIN = 0.08
SAT_GRAIN = 0.06
MIN_BLOBS = 6  # each image gets MIN_BLOBS..2*MIN_BLOBS hard-edged "objects"

SPLITS = {"train": 0, "val": 1}  # split ids feed the per-image RNG seed


def class_name(cls: int) -> str:
    """ImageNet-style wnid; zero-padded so sorted order equals class index order."""
    return f"n{cls:08d}"


def file_name(split: str, cls: int, idx: int) -> str:
    prefix = "val_" if split == "val" else ""
    return f"{prefix}{class_name(cls)}_{idx}.JPEG"


def image_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(width, height): shorter side uniform in [min_side, max_side], photo-like aspect."""
    short = int(rng.integers(min_side, max_side + 1))
    # Mostly 1..4/3 (4:3 and near-square photos), a few wider up to 2:1 (panoramas-ish).
    ratio = rng.uniform(1.0, 4 / 3) if rng.random() < 0.85 else rng.uniform(4 / 3, 2.0)
    long = int(round(short * ratio))
    # About 3 in 4 photos are landscape.
    return (long, short) if rng.random() < 0.75 else (short, long)


def smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Float32 HxW field in about [-1, 1] that varies smoothly over ~`cells` cells per side."""
    gw, gh = max(2, round(cells * w / min(w, h))), max(2, round(cells * h / min(w, h)))
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC))  # float32 -> mode "F"


def fractal_noise(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Multi-octave noise: detail at every scale, as in photos, so JPEG size is photo-like."""
    out = np.zeros((h, w), np.float32)
    amp = 1.0
    for cells in (4, 12, 36, 108):
        out += amp * smooth_noise(rng, w, h, cells)
        amp *= 0.6
    return out / 2.2


def class_hue(cls: int, classes: int) -> float:
    """Hue in [0, 1): classes spread evenly over the colour wheel."""
    return cls / classes


def class_stripes(cls: int) -> tuple[float, float]:
    """(angle in radians, cycles per shorter side) for the class's stripe texture.

    Angles lie in [0, pi/2) so a horizontal flip (angle -> -angle) never turns one
    class's stripes into another's; frequency cycles independently of the angle.
    """
    angle = (np.pi / 2) * ((cls * 5) % 8) / 8
    cycles = 6.0 + 3.0 * (cls % 3)
    return float(angle), cycles


def add_blobs(rng: np.random.Generator, val: np.ndarray, count: int) -> None:
    """Add `count` hard-edged ellipses of lighter/darker value to `val` in place.

    Photos have object edges (sharp transitions cost JPEG bits and give crops some
    structure besides the stripes); the ellipses are per-image, not per-class.
    """
    h, w = val.shape
    short = min(w, h)
    for _ in range(count):
        rx, ry = rng.uniform(0.04, 0.2, size=2) * short
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        theta = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.2, 0.2)
        # Only touch the ellipse's bounding box: a blob costs what it covers.
        r = max(rx, ry)
        x0, x1 = int(max(0, cx - r)), int(min(w, cx + r + 1))
        y0, y1 = int(max(0, cy - r)), int(min(h, cy + r + 1))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
        v = (dy * np.cos(theta) - dx * np.sin(theta)) / ry
        val[y0:y1, x0:x1] += offset * (u * u + v * v < 1.0)


def render(rng: np.random.Generator, cls: int, classes: int, w: int, h: int) -> Image.Image:
    """One RGB image of class `cls`, built in HSV so hue carries the class exactly."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / min(w, h)

    def grain(sigma: float) -> np.ndarray:
        return sigma * rng.standard_normal(size=(h, w), dtype=np.float32)

    # Hue: the class hue, a per-image shift, gentle spatial drift and a little chroma
    # grain, all kept well inside half the gap between neighbouring class hues.
    spread = min(0.03, 0.3 / classes)
    hue = class_hue(cls, classes) + rng.uniform(-spread, spread)
    hue = hue + 0.5 * spread * smooth_noise(rng, w, h, 3) + grain(0.25 * spread)

    # Saturation: vivid enough that hue survives saturation jitter of -40%.
    sat = rng.uniform(0.55, 0.85) + 0.12 * smooth_noise(rng, w, h, 4) + grain(SAT_GRAIN)

    # Value: brightness gradient + class stripes + objects + multi-scale texture + grain.
    angle, cycles = class_stripes(cls)
    cycles *= rng.uniform(0.9, 1.1)
    phase = 2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi)
    gx, gy = rng.uniform(-0.15, 0.15, size=2)
    val = (
        rng.uniform(0.5, 0.7)
        + gx * (xx - 0.5) + gy * (yy - 0.5)
        + rng.uniform(0.15, 0.22) * np.sin(phase)
        + 0.18 * fractal_noise(rng, w, h)
        + grain(VALUE_GRAIN)
    )
    add_blobs(rng, val, int(rng.integers(MIN_BLOBS, 2 * MIN_BLOBS + 1)))

    hsv = np.stack([np.mod(hue, 1.0), sat, val], axis=-1)
    hsv8 = np.clip(np.rint(hsv * 255.0), 0, 255).astype(np.uint8)
    return Image.frombytes("HSV", (w, h), hsv8.tobytes()).convert("RGB")


def make_one(task: tuple) -> int:
    """Render and write one image; returns its size in bytes. Runs in a worker."""
    out, split, cls, idx, classes, seed, min_side, max_side, photo_like = task
    rng = np.random.default_rng([seed, SPLITS[split], cls, idx])
    if photo_like:
        w, h = photo_size(rng, min_side, max_side)
        img = render_photo(rng, cls, classes, w, h)
    else:
        w, h = image_size(rng, min_side, max_side)
        img = render(rng, cls, classes, w, h)
    path = Path(out) / split / class_name(cls) / file_name(split, cls, idx)
    # Baseline (not progressive) 4:2:0 like most ImageNet files; no EXIF, so bytes are reproducible.
    img.save(path, "JPEG", quality=int(rng.integers(85, 96)), subsampling=2, progressive=False)
    return path.stat().st_size


def check_args(out: Path, classes: int, train_per_class: int, val_per_class: int, seed: int,
               min_side: int, max_side: int, workers: int | None) -> None:
    if classes < 1:
        raise UserError(f"--classes must be >= 1, got {classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise UserError(f"--train-per-class and --val-per-class must be >= 1, "
                        f"got {train_per_class} and {val_per_class}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if min_side < 16:
        raise UserError(f"--min-side must be >= 16, got {min_side}")
    if min_side > max_side:
        raise UserError(f"--min-side ({min_side}) must be <= --max-side ({max_side})")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory path")
    for split in SPLITS:
        d = out / split
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise UserError(f"{d} already exists and is not empty; "
                            f"pass a new --out directory or delete it first")


def bar_iter(items, bar):
    """Yield `items`, advancing the progress bar by one for each."""
    for item in items:
        yield item
        bar.update(1)


def make_dataset(out, classes: int, train_per_class: int, val_per_class: int, seed: int,
                 min_side: int = 300, max_side: int = 500, workers: int | None = None,
                 progress: bool = True, photo_like: bool = False) -> dict:
    """Write the data set under `out`; returns {"classes", "train", "val", "bytes"}. photo_like: photographs'
    statistics (tools/photo_like.py) instead of the learnable stripes and hues."""
    out = Path(out)
    check_args(out, classes, train_per_class, val_per_class, seed, min_side, max_side, workers)
    counts = {"train": train_per_class, "val": val_per_class}
    for split in SPLITS:
        for cls in range(classes):
            (out / split / class_name(cls)).mkdir(parents=True, exist_ok=True)

    tasks = [(str(out), split, cls, idx, classes, seed, min_side, max_side, photo_like)
             for split in SPLITS for cls in range(classes) for idx in range(counts[split])]
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    with progress_bar(len(tasks), "make_dataset", unit="images", enabled=progress) as bar:
        if workers == 1:
            sizes = [make_one(t) for t in bar_iter(tasks, bar)]  # no pool start-up cost for tiny runs
        else:
            # forkserver, not fork: a caller with threads (torch, DALI) must not hand their locked state to workers
            with multiprocessing.get_context("forkserver").Pool(workers) as pool:
                chunksize = max(1, min(32, len(tasks) // (8 * workers)))
                sizes = list(bar_iter(pool.imap_unordered(make_one, tasks, chunksize=chunksize), bar))
    return {"classes": classes, "train": classes * train_per_class,
            "val": classes * val_per_class, "bytes": int(sum(sizes))}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.make_dataset", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output directory (train/ and val/ go here)")
    p.add_argument("--classes", required=True, type=int)
    p.add_argument("--train-per-class", required=True, type=int)
    p.add_argument("--val-per-class", required=True, type=int)
    p.add_argument("--seed", required=True, type=int)
    p.add_argument("--min-side", type=int, default=300, help="shorter side lower bound, px (default 300)")
    p.add_argument("--max-side", type=int, default=500, help="shorter side upper bound, px (default 500)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: os.cpu_count())")
    p.add_argument("--photo-like", action="store_true",
                   help="photographs' statistics (shapes, 1/f colour noise, textures, grain; ImageNet's frame "
                        "sizes), so that decoding costs what it costs on real photos (default: learnable stripes)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        counts = make_dataset(args.out, args.classes, args.train_per_class, args.val_per_class,
                              args.seed, args.min_side, args.max_side, args.workers,
                              photo_like=args.photo_like)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    secs = time.perf_counter() - start
    n = counts["train"] + counts["val"]
    print(f"wrote {counts['classes']} classes: {counts['train']} train + {counts['val']} val images, "
          f"{counts['bytes'] / 1e6:.1f} MB ({counts['bytes'] / max(n, 1) / 1e3:.0f} KB/image) "
          f"to {args.out} in {secs:.1f} s")


if __name__ == "__main__":
    main()
