"""tools.prepare_imagenet's checks of the layout it writes: an --out that already holds a split is refused
before anything is placed, and afterwards the prepared folders are counted against the expected classes and
images and the report (prepare_report.json and the printed table) is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rn50.config.errors import UserError

EXPECT_TRAIN, EXPECT_VAL, EXPECT_CLASSES = 1_281_167, 50_000, 1_000
SPLITS = ("train", "val")


def check_out(out) -> None:
    """Refuse an --out whose train/ or val/ already holds something: mixing two preparations, or
    overwriting a finished one, would leave a split nobody can vouch for."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory path")
    for split in SPLITS:
        d = out / split
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise UserError(f"{d} already exists and is not empty; pass a new --out directory or delete it first")


def count_split(folder) -> dict[str, int]:
    """{class folder name: number of files in it} for one split (symlinks to files count)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {e.name: sum(1 for f in os.scandir(e.path) if f.is_file() and not f.name.startswith("."))
            for e in sorted(os.scandir(folder), key=lambda e: e.name)
            if e.is_dir() and not e.name.startswith(".")}


def verify(out, expect_train: int = EXPECT_TRAIN, expect_val: int = EXPECT_VAL,
           expect_classes: int = EXPECT_CLASSES) -> dict:
    """Count what `out` holds and compare with the expectations; returns the report (see `problems`)."""
    out = Path(out)
    per_class = {split: count_split(out / split) for split in SPLITS}
    expected = {"train": expect_train, "val": expect_val}
    report: dict = {"out": str(out.absolute()), "splits": {}, "problems": []}
    problems = report["problems"]
    for split in SPLITS:
        counts = per_class[split]
        images = sum(counts.values())
        report["splits"][split] = {"classes": len(counts), "images": images,
                                   "expected_classes": expect_classes, "expected_images": expected[split],
                                   "empty_classes": [c for c, n in counts.items() if n == 0],
                                   "per_class": counts}
        if len(counts) != expect_classes:
            problems.append(f"{split} has {len(counts):,} classes, expected {expect_classes:,}")
        if images != expected[split]:
            problems.append(f"{split} has {images:,} images, expected {expected[split]:,}")
        empty = report["splits"][split]["empty_classes"]
        if empty:
            problems.append(f"{split} has {len(empty)} empty classes: {', '.join(empty[:5])}"
                            + (" ..." if len(empty) > 5 else ""))
    train, val = set(per_class["train"]), set(per_class["val"])
    # The loaders take class indices from train's folders: a val class train lacks cannot be labelled.
    report["val_classes_not_in_train"] = sorted(val - train)
    report["train_classes_not_in_val"] = sorted(train - val)
    for key, what in (("val_classes_not_in_train", "val classes missing from train"),
                      ("train_classes_not_in_val", "train classes missing from val")):
        if report[key]:
            problems.append(f"{len(report[key])} {what}: {', '.join(report[key][:5])}"
                            + (" ..." if len(report[key]) > 5 else ""))
    report["ok"] = not problems
    return report


def format_table(report: dict) -> str:
    """The split / classes / images table printed after preparation."""
    rows = [f"{'split':<6} {'classes':>8} {'expected':>9} {'images':>11} {'expected':>11}"]
    for split, s in report["splits"].items():
        ok = s["classes"] == s["expected_classes"] and s["images"] == s["expected_images"]
        rows.append(f"{split:<6} {s['classes']:>8,} {s['expected_classes']:>9,} {s['images']:>11,} "
                    f"{s['expected_images']:>11,}  {'ok' if ok else 'DIFFERS'}")
    return "\n".join(rows)


def write_report(out, report: dict) -> Path:
    path = Path(out) / "prepare_report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
