"""Dataset statistics: class counts and imbalance, image sizes, per-channel mean and std (for --normalize).

    python -m tools.stats DIR [--sample N] [--workers N] [--out stats.json | --out preset.toml]

DIR is a folder of class folders, or a dataset with train/ (and val/): then the training split is measured
(normalisation statistics come from the training data) and val's class counts are reported too.

- class counts per split, and the imbalance (largest class / smallest class; none, `null` in JSON, when a
  class folder holds no image: that is no balance, and rn50.train refuses an empty training class);
- image sizes (header only, every file): min, median and max of width and height;
- per-channel mean and std on 0-1 pixels, over every pixel of every image (or of `--sample N` images chosen
  with a fixed seed), each image decoded by PIL and converted to RGB. The sums are exact (integer sums of
  the 0-255 values and of their squares), then mean = S / (255 n), std = sqrt(Q / (255^2 n) - mean^2)
  (the population std) in float64;
- the flag to pass to training: `--normalize MEAN_R,MEAN_G,MEAN_B,STD_R,STD_G,STD_B`.

`--out FILE.json` writes all of it as JSON (its "normalize" is the six numbers); `--out FILE.toml` writes a
recipe preset (`[augmentation] normalize = [...]`) for `rn50.train --preset FILE.toml`. Files that cannot be
read are counted and listed, not fatal. Exit code 0, or 2 with a one-line `error: ...` for a user mistake.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.errors import UserError
from tools.progress import bar as progress_bar
from tools.split import IMAGE_SUFFIXES, is_image

SAMPLE_SEED = 0


def class_counts(folder: Path) -> dict[str, list[Path]]:
    return {c.name: sorted(f for f in c.iterdir() if f.is_file() and is_image(f))
            for c in sorted(folder.iterdir()) if c.is_dir()}


def measure(path: str) -> tuple:
    """Worker: (path, width, height, pixels, [sum R, G, B], [sum of squares R, G, B]) or (path, error)."""
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.int64).reshape(-1, 3)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
        return path, f"{type(e).__name__}: {e}"
    w_h = rgb.shape[0]
    return path, (int(w_h), rgb.sum(axis=0).tolist(), (rgb * rgb).sum(axis=0).tolist())


def image_size(path: str):
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - reported by measure when sampled; sizes skip it
        return None


def survey(job: tuple[str, bool]) -> tuple:
    """Worker: one image's (header size or None, measure's result or None): the size of every file, the
    pixel sums of the sampled ones. One call per image, so the progress bar counts each image once."""
    path, sampled = job
    return image_size(path), measure(path)[1] if sampled else None


def mean_std(pixels: int, sums, squares) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std on 0-1 pixels from exact integer sums of 0-255 values."""
    mean = [s / (255.0 * pixels) for s in sums]
    std = [math.sqrt(max(q / (255.0 ** 2 * pixels) - m * m, 0.0)) for q, m in zip(squares, mean)]
    return mean, std


def _summary(values: list[int]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}


def stats(dataset, sample: int | None = None, workers: int | None = None, progress: bool = True) -> dict:
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise UserError(f"{dataset} is not a folder; pass a folder of class folders or a dataset with train/")
    if sample is not None and sample < 1:
        raise UserError(f"--sample must be >= 1, got {sample}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    splits = {s: dataset / s for s in ("train", "val") if (dataset / s).is_dir()} if (dataset / "train").is_dir() \
        else {"images": dataset}
    by_split = {s: class_counts(folder) for s, folder in splits.items()}
    measured = by_split["train" if "train" in by_split else "images"]
    files = [str(f) for fs in measured.values() for f in fs]
    if not files:
        raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in class folders of "
                        f"{splits.get('train', dataset)}")
    chosen = files if sample is None or sample >= len(files) else sorted(random.Random(SAMPLE_SEED).sample(files, sample))
    workers = max(1, min(workers or os.cpu_count() or 1, len(files)))

    sizes, pixels, sums, squares, bad = [], 0, [0, 0, 0], [0, 0, 0], []
    sampled = set(chosen)
    jobs = [(f, f in sampled) for f in files]
    with progress_bar(len(files), "stats", unit="images", enabled=progress) as bar:
        pool = multiprocessing.get_context("forkserver").Pool(workers) if workers > 1 else None
        try:
            run = (lambda f, xs: pool.imap(f, xs, chunksize=8)) if pool else map
            for (path, _), (size, result) in zip(jobs, run(survey, jobs)):
                if size is not None:
                    sizes.append(size)
                if isinstance(result, str):
                    bad.append({"path": path, "error": result})
                elif result is not None:
                    n, s, q = result
                    pixels += n
                    sums = [a + b for a, b in zip(sums, s)]
                    squares = [a + b for a, b in zip(squares, q)]
                bar.update(1)
        finally:
            if pool:
                pool.close()
                pool.join()
    if not pixels:
        raise UserError(f"none of the {len(chosen)} measured images could be read; see `python -m tools.scan`")
    mean, std = mean_std(pixels, sums, squares)

    report = {"dataset": str(dataset.resolve()), "measured": str(splits.get("train", dataset)),
              "splits": {}, "images_measured": len(chosen) - len(bad), "pixels": pixels,
              "mean": mean, "std": std, "normalize": mean + std,
              "width": _summary([w for w, _ in sizes]), "height": _summary([h for _, h in sizes]),
              "unreadable": sorted(bad, key=lambda e: e["path"])}
    for split, classes in by_split.items():
        counts = {c: len(fs) for c, fs in classes.items()}
        nonzero = [n for n in counts.values() if n]
        report["splits"][split] = {
            "images": sum(counts.values()), "classes": len(counts), "counts": counts,
            # an empty class is infinitely imbalanced, never 1.00 (the ratio of the others): None, said in words
            "imbalance": max(nonzero) / min(nonzero) if nonzero and len(nonzero) == len(counts) else None,
            "empty_classes": [c for c, n in counts.items() if not n]}
    return report


def normalize_flag(report: dict) -> str:
    return "--normalize " + ",".join(f"{v:.6g}" for v in report["normalize"])


def preset_toml(report: dict) -> str:
    values = ", ".join(repr(float(v)) for v in report["normalize"])
    return (f"# per-channel mean and std of {report['measured']} ({report['images_measured']} images), "
            f"written by python -m tools.stats\n[augmentation]\nnormalize = [{values}]\n")


def summary(report: dict, top: int = 5) -> str:
    lines = []
    for split, s in report["splits"].items():
        empty = len(s["empty_classes"])
        ratio = (f"infinite ({empty} {'class has' if empty == 1 else 'classes have'} no images)" if empty else
                 "n/a" if s["imbalance"] is None else f"{s['imbalance']:.2f}")
        lines.append(f"{split}: {s['images']} images, {s['classes']} classes, imbalance (largest/smallest) {ratio}")
        ordered = sorted(s["counts"].items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ordered if len(ordered) <= 2 * top else ordered[:top] + [("...", None)] + ordered[-top:]
        lines += [f"  {n:8d}  {c}" if n is not None else "       ..." for c, n in shown]
        consequence = {"train": "rn50.train refuses an empty class folder: add images or remove it",
                       "val": "validation cannot count this class",
                       "images": "tools.split leaves it out; rn50.train refuses an empty class folder"}[split]
        for c in s["empty_classes"]:
            lines.append(f"  warning: {split}/{c} has no images ({consequence})")
    w, h = report["width"], report["height"]
    if w:
        lines.append(f"size: width min {w['min']} / median {w['median']:g} / max {w['max']}, "
                     f"height min {h['min']} / median {h['median']:g} / max {h['max']} px")
    lines.append(f"mean (R,G,B) {', '.join(f'{v:.4f}' for v in report['mean'])}; "
                 f"std {', '.join(f'{v:.4f}' for v in report['std'])} "
                 f"(0-1 pixels, {report['images_measured']} images)")
    if report["unreadable"]:
        lines.append(f"{len(report['unreadable'])} files could not be read (left out): "
                     f"{report['unreadable'][0]['path']} ...")
    lines.append(f"train with: {normalize_flag(report)}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.stats", description=__doc__.split("\n")[0])
    p.add_argument("dataset", type=Path, metavar="DIR", help="folder of class folders, or a dataset with train/")
    p.add_argument("--sample", type=int, default=None, help="measure mean/std on N images (default: all)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: os.cpu_count())")
    p.add_argument("--out", type=Path, default=None, help="FILE.json (the report) or FILE.toml (a recipe preset)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.out is not None and args.out.suffix not in (".json", ".toml"):
            raise UserError(f"--out {args.out} must end in .json (the report) or .toml (a recipe preset)")
        report = stats(args.dataset, args.sample, args.workers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = preset_toml(report) if args.out.suffix == ".toml" else json.dumps(report, indent=1) + "\n"
        args.out.write_text(text)
        use = f"rn50.train --preset {args.out}" if args.out.suffix == ".toml" else "its \"normalize\""
        print(f"wrote {args.out} ({use})")


if __name__ == "__main__":
    main()
