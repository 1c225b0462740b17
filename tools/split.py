"""Split one folder of class folders into train/ and val/: stratified, deterministic, made of links.

    python -m tools.split DIR --out OUT --val-fraction 0.2 --seed 0 [--copy]

DIR holds one folder per class (`DIR/<class>/<image files>`); image files are .jpg/.jpeg/.png/.bmp/.tif/
.tiff/.webp (any case), anything else is left out (and counted). Each class is split on its own: its files,
sorted by name, are shuffled with a generator seeded by (seed, class name), and the first
round(n * F) become validation files, at least 1 when the class has 2 or more files and at most n - 1 (a
class of one file goes to train alone, with a warning that validation cannot count it). A class folder with no
image file is left out of train/ and val/, with one line naming it: rn50.train refuses an empty training class
folder (pipelines.folder.list_split). The same DIR, fraction and seed give the same split.

OUT gets `OUT/train/<class>/<name>` and `OUT/val/<class>/<name>` (the layout `rn50.train --data OUT` reads):
symbolic links to the originals' absolute paths by default (DIR is never moved, copied or written to), or
copies with `--copy`. OUT must not exist or be empty; every class with an image gets its folder in train/ and
val/ (val/<class>/ stays empty for a class of one file).
Exit code 0, or 2 with a one-line `error: ...` for a user mistake.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from pathlib import Path

from pipelines.errors import UserError
from pipelines.folder import IMAGE_SUFFIXES  # the files the loaders read
from tools.progress import bar as progress_bar


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def class_files(source: Path) -> tuple[dict[str, list[Path]], int]:
    """({class: sorted image files}, number of other files left out) of a folder of class folders."""
    if not source.is_dir():
        raise UserError(f"{source} is not a folder; pass the folder that holds one folder per class")
    classes, skipped = {}, 0
    for entry in sorted(source.iterdir()):
        if not entry.is_dir():
            skipped += 1
            continue
        files = []
        for f in sorted(entry.iterdir()):
            if f.is_file() and is_image(f):
                files.append(f)
            else:
                skipped += 1
        classes[entry.name] = files
    if not classes:
        raise UserError(f"{source} has no class folders; put each class's images in {source}/<class>/")
    if set(classes) <= {"train", "val"} and (source / "train").is_dir():
        raise UserError(f"{source} is already split (train/, val/); pass the folder of class folders to split, "
                        f"e.g. {source / 'train'}")
    if not any(classes.values()):
        raise UserError(f"{source}'s class folders hold no image files ({', '.join(IMAGE_SUFFIXES)})")
    return classes, skipped


def val_count(n: int, fraction: float) -> int:
    """Validation files of a class of n: round(n * fraction), at least 1 (n >= 2) and at most n - 1."""
    if n < 2:
        return 0
    return min(n - 1, max(1, round(n * fraction)))


def plan(classes: dict[str, list[Path]], fraction: float, seed: int) -> dict[str, dict[str, list[Path]]]:
    """{"train": {class: files}, "val": {class: files}}, each list sorted by name."""
    out = {"train": {}, "val": {}}
    for cls, files in classes.items():
        order = list(files)
        random.Random(f"{seed}/{cls}").shuffle(order)  # str seeds hash the same in every process and run
        k = val_count(len(order), fraction)
        out["val"][cls] = sorted(order[:k])
        out["train"][cls] = sorted(order[k:])
    return out


def _check_args(source: Path, out: Path, fraction: float) -> None:
    if not 0 < fraction < 1:
        raise UserError(f"--val-fraction must lie strictly between 0 and 1, got {fraction}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; pass a new folder (the split never "
                        "overwrites files)")
    s, o = source.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise UserError(f"--out {out} lies inside {source}, where it would become a class; pass a folder outside it")


def split(source, out, fraction: float, seed: int, copy: bool = False, progress: bool = True) -> dict:
    """Write the split of `source` into `out`; returns {"train", "val", "classes" (those split), "skipped",
    "empty" (class folders with no image file, left out), "single" (classes of one file: train only)}."""
    source, out = Path(source), Path(out)
    _check_args(source, out, fraction)
    classes, skipped = class_files(source)
    empty = [cls for cls, files in classes.items() if not files]  # left out: rn50.train refuses an empty class
    parts = plan({cls: files for cls, files in classes.items() if files}, fraction, seed)
    total = sum(len(files) for files in classes.values())
    with progress_bar(total, "split", enabled=progress) as bar:
        for part, by_class in parts.items():
            for cls, files in by_class.items():
                folder = out / part / cls
                folder.mkdir(parents=True, exist_ok=True)
                for f in files:
                    if copy:
                        shutil.copy2(f, folder / f.name)
                    else:
                        os.symlink(os.path.abspath(f), folder / f.name)
                    bar.update(1)
    return {"classes": len(classes) - len(empty), "skipped": skipped, "empty": empty,
            "train": sum(map(len, parts["train"].values())), "val": sum(map(len, parts["val"].values())),
            "single": [cls for cls, files in classes.items() if len(files) == 1]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.split", description=__doc__.split("\n")[0])
    p.add_argument("source", type=Path, metavar="DIR", help="folder of class folders (DIR/<class>/<images>)")
    p.add_argument("--out", required=True, type=Path, help="new folder for train/<class>/ and val/<class>/")
    p.add_argument("--val-fraction", type=float, required=True, help="share of each class for validation")
    p.add_argument("--seed", type=int, default=0, help="the split's seed (default 0)")
    p.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        counts = split(args.source, args.out, args.val_fraction, args.seed, args.copy)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    how = "copies" if args.copy else "links"
    print(f"split {counts['train'] + counts['val']} images of {counts['classes']} classes into "
          f"{counts['train']} train + {counts['val']} val ({how}) under {args.out} (seed {args.seed})")
    if counts["skipped"]:
        n = counts["skipped"]
        print(f"left out {n} {'entry that is not an image file' if n == 1 else 'entries that are not image files'} "
              "in a class folder")
    if counts["empty"]:
        n, names = len(counts["empty"]), ", ".join(counts["empty"])
        print(f"left out {n} class {'folder' if n == 1 else 'folders'} with no image file ({names}): rn50.train "
              "refuses an empty class folder; add images to split it too")
    for cls in counts["single"]:
        print(f"warning: class {cls} has 1 image: it goes to train only, so validation cannot count it")


if __name__ == "__main__":
    main()
