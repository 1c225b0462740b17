"""Scan a dataset for files that would stop or spoil training, and write manifests of the good ones.

One corrupt JPEG stops a DALI pipeline mid-epoch (docs/design.md#dali-behaviour). This tool decodes
every file of every split once, on all cores, before a run does:

    python -m tools.scan DIR --out OUT [--min-side 8] [--workers N] [--fix]

DIR is the ImageNet layout (`DIR/train/<class>/*.JPEG`, optionally `DIR/val/<class>/*.JPEG`). Every
file in a class folder is looked at: names ending in .jpeg/.jpg, .png, .bmp, .tif/.tiff or .webp (any
case: pipelines.folder.IMAGE_SUFFIXES, what the loaders read) are decoded, anything else (notes.txt) is
reported as "not an image name" (the loaders ignore such files too).
A PNG/BMP/TIFF/WebP file under its own suffix is good. CMYK JPEGs and PNG/BMP/TIFF/WebP data behind
another name are still reported as bad here (the GPU loader stops on them), and the summary says how
many of them the CPU loaders (dali-cpu, torchvision) read anyway. A file is bad when it is empty,
truncated, undecodable (a full PIL decode, truncated images not tolerated), another format behind a
JPEG name (PNG, GIF, ...), a CMYK JPEG, too small to crop (shorter side < --min-side), or has any
problem that `pipelines.jpeg_check.header_problem` (the pre-flight check training runs) reports, so
that a file this scan lists as good always passes that pre-flight check.

Outputs, all under OUT (DIR is never written to: datasets are often read-only mounts):

- `OUT/<split>.txt` per split: one `path label` line per good file, DALI's `file_list` format, sorted
  by class folder then file name. `path` is relative to `DIR/<split>/`; the label is the index of the
  class in the sorted class folder names of the *training* split (for val too, as the loaders do).
  Paths may contain spaces: the label is the text after the last space.
- `OUT/scan_report.json`: {"dataset", "out", "min_side", "fix", "workers", "seconds",
  "splits": {split: {"files", "good", "fixed", "classes", "bad": [{"path", "reason", "detail"?,
  "fixed"?}], "reasons": {reason: count}, "empty_classes": [...]}}}. `files` counts every file found,
  `good` the lines of `<split>.txt` (fixed files included), `bad` every file with a problem (fixed
  ones carry the absolute path of their re-encoded copy under "fixed").
- With `--fix`, files whose pixels PIL can read (PNG/GIF/... behind a JPEG name, CMYK JPEGs, complete
  JPEGs with a long trailer) are re-encoded as RGB baseline JPEGs, quality 95, EXIF orientation applied
  (as DALI's decoder would show them), into `OUT/fixed/<split>/<class>/<name>`; `<split>.txt` lists
  each with its ABSOLUTE path, which the training side uses as is (relative paths are resolved against
  `DIR/<split>/`). Empty, truncated, undecodable and too-small files cannot be fixed.

Exit code 0 whenever the scan ran, bad files or not; 2 with a one-line `error: ...` for a user mistake.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

from pipelines.errors import UserError
from pipelines.folder import IMAGE_SUFFIXES, SPLITS
from pipelines.jpeg_check import (NOT_AN_IMAGE, OTHER_FORMATS, TEXT, TRUNCATED, ZERO_BYTES, decodes_by_content,
                                  header_problem)
from tools.progress import bar as progress_bar

REPORT_NAME = "scan_report.json"
FIXED_DIR = "fixed"

NOT_IMAGE_NAME = "not an image name"  # a suffix the loaders do not read (IMAGE_SUFFIXES): notes.txt, not x.png
NOT_IN_CLASS = "not in a class folder"
UNLISTABLE = "file name has a line break"
UNDECODABLE = "undecodable"
TOO_SMALL = "too small to crop"
TOO_LARGE = "too large to decode"
BEHIND_NAME = "data behind a JPEG name"
JPEG_FORMATS = ("JPEG", "MPO")  # PIL calls a JPEG with extra multi-picture frames (phones) "MPO"
FIX_QUALITY = 95


# ---- one file (runs in a worker process) ----

def _decode(path: str) -> Image.Image:
    """Open and fully decode; a truncated file raises (ImageFile.LOAD_TRUNCATED_IMAGES off)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
        return im
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def inspect(path: str, min_side: int) -> tuple[str | None, str | None, Image.Image | None]:
    """(reason, detail, image): reason None for a good file; image set when a bad file can be fixed."""
    header = header_problem(path)
    if header in (ZERO_BYTES, NOT_AN_IMAGE, TEXT) or (header or "").startswith("unreadable"):
        return header, None, None
    try:
        im = _decode(path)
    except Image.DecompressionBombError as e:
        return TOO_LARGE, str(e), None
    except Exception as e:  # noqa: BLE001 - arbitrary bytes make PIL raise OSError, SyntaxError, ValueError...
        reason = header if header == TRUNCATED or (header or "").endswith(BEHIND_NAME) else UNDECODABLE
        return reason, f"{type(e).__name__}: {e}", None
    w, h = im.size
    if min(w, h) < min_side:
        return TOO_SMALL, f"{w}x{h} px: shorter side below --min-side {min_side}", None
    if header == TRUNCATED:  # yet PIL decoded it all: a trailer longer than the header check allows
        return header, "decodes fully: more than 4 KB of data follow the end-of-image marker", im
    if header is not None:
        return header, None, im
    # PIL names formats in capitals ("WEBP"), OTHER_FORMATS as the header check does ("WebP"): compare
    # without case, and report under the header check's name so that both give the same reason.
    fmt = next((name for name in OTHER_FORMATS.values() if name.upper() == (im.format or "").upper()), im.format)
    if OTHER_FORMATS.get(Path(path).suffix.lower()) == fmt:
        return None, None, None  # a PNG named .png, ...: decoded by content, converted to RGB by the loaders
    if im.format not in JPEG_FORMATS:
        return f"{fmt} {BEHIND_NAME}", None, im
    if im.mode not in ("RGB", "L"):
        return f"unusual JPEG (mode {im.mode})", None, im
    return None, None, None


def reencode(im: Image.Image, dest: Path) -> None:
    """Write `im` as an RGB baseline JPEG at `dest` (atomically: a crash leaves no half file)."""
    rgb = ImageOps.exif_transpose(im).convert("RGB")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    rgb.save(tmp, "JPEG", quality=FIX_QUALITY, progressive=False)
    os.replace(tmp, dest)
    problem = header_problem(dest)
    if problem is not None:
        raise RuntimeError(f"re-encoded {dest} fails the header check: {problem}")


def scan_one(task: tuple) -> tuple:
    """Worker: (split, class, name, reason, detail, fixed absolute path or None)."""
    split, cls, name, path, min_side, fix_dir = task
    reason, detail, im = inspect(path, min_side)
    fixed = None
    if reason is not None and im is not None and fix_dir is not None:
        dest = Path(fix_dir) / split / cls / name
        reencode(im, dest)
        fixed = str(dest)
    return split, cls, name, reason, detail, fixed


# ---- the dataset ----

def _check_args(dataset: Path, out: Path, min_side: int, workers: int | None) -> None:
    if not dataset.is_dir():
        raise UserError(f"dataset folder {dataset} does not exist; pass the folder that holds "
                        "train/<class>/*.JPEG (and val/<class>/*.JPEG)")
    if not (dataset / "train").is_dir():
        raise UserError(f"{dataset / 'train'} is missing; the dataset folder needs train/ "
                        "(and optionally val/), each with one folder per class")
    if min_side < 1:
        raise UserError(f"--min-side must be >= 1, got {min_side}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the manifests and the report")
    d, o = dataset.resolve(), out.resolve()
    if o == d or d in o.parents:
        raise UserError(f"--out {out} lies inside the dataset {dataset}; the scanner never writes into a "
                        "dataset (it may be a read-only mount): pass a folder outside it")
    if (o / FIXED_DIR) == d or (o / FIXED_DIR) in d.parents:
        raise UserError(f"the dataset {dataset} lies inside {out / FIXED_DIR}, where --fix writes; "
                        "pass another --out folder")


def training_classes(dataset: Path) -> list[str]:
    """Sorted class folder names of the training split: label i is the i-th name (as the loaders do)."""
    names = sorted(p.name for p in (dataset / "train").iterdir() if p.is_dir())
    if not names:
        raise UserError(f"{dataset / 'train'} has no class folders; put each class's JPEGs in train/<class>/")
    return names


def list_split(dataset: Path, split: str, index: dict[str, int], min_side: int, fix_dir: str | None):
    """(tasks to decode, bad entries found by name alone, class folder names, file count) of one split."""
    split_dir = dataset / split
    tasks, bad, classes, count = [], [], [], 0
    for entry in sorted(split_dir.iterdir()):
        if entry.is_file():
            count += 1
            bad.append({"path": entry.name, "reason": NOT_IN_CLASS})
            continue
        if not entry.is_dir():
            continue
        if entry.name not in index:
            raise UserError(f"{entry} is a class that {dataset / 'train'} does not have; validation classes "
                            "must be a subset of the training classes (rename or remove it)")
        classes.append(entry.name)
        for f in sorted(entry.iterdir()):
            if not f.is_file():  # nested folders, broken links: the loaders skip them too
                continue
            count += 1
            rel = f"{entry.name}/{f.name}"
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                bad.append({"path": rel, "reason": NOT_IMAGE_NAME})
            elif "\n" in f.name or "\r" in f.name:
                bad.append({"path": rel, "reason": UNLISTABLE})
            else:
                tasks.append((split, entry.name, f.name, str(f), min_side, fix_dir))
    return tasks, bad, classes, count


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _run(tasks: list, workers: int):
    """Yield scan_one's results (in any order) over all cores."""
    if workers == 1:
        yield from map(scan_one, tasks)
        return
    chunksize = max(1, min(32, len(tasks) // (16 * workers)))
    # forkserver, not fork: a caller with threads (torch, DALI) must not hand their locked state to workers
    with multiprocessing.get_context("forkserver").Pool(workers) as pool:
        yield from pool.imap_unordered(scan_one, tasks, chunksize=chunksize)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader never sees half a manifest


def scan(dataset, out, min_side: int = 8, workers: int | None = None, fix: bool = False,
         progress: bool = True) -> dict:
    """Scan every split of `dataset`, write `out/<split>.txt` and `out/scan_report.json`; return the report."""
    dataset, out = Path(dataset), Path(out)
    _check_args(dataset, out, min_side, workers)
    start = time.perf_counter()
    classes = training_classes(dataset)
    index = {name: i for i, name in enumerate(classes)}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out} ({e.strerror}); pass a folder you can write to") from None
    fix_dir = str((out / FIXED_DIR).resolve()) if fix else None

    splits = [s for s in SPLITS if (dataset / s).is_dir()]
    tasks, per_split = [], {}
    for split in splits:
        split_tasks, bad, split_classes, count = list_split(dataset, split, index, min_side, fix_dir)
        tasks += split_tasks
        per_split[split] = {"files": count, "bad": bad, "classes": split_classes, "good": []}

    workers = max(1, min(workers or _cpu_count(), len(tasks)))
    bar = progress_bar(len(tasks), "scan", enabled=progress)
    bar.set_postfix_str("0 bad", refresh=False)
    done = bad_count = 0
    for split, cls, name, reason, detail, fixed in _run(tasks, workers):
        done += 1
        rel = f"{cls}/{name}"
        if reason is not None:
            bad_count += 1
            entry = {"path": rel, "reason": reason}
            if detail:
                entry["detail"] = detail
            if fixed:
                entry["fixed"] = fixed
            per_split[split]["bad"].append(entry)
        if reason is None or fixed:
            per_split[split]["good"].append((cls, name, fixed or rel, index[cls]))
            bar.set_postfix_str(f"{bad_count} bad", refresh=False)
        bar.update(1)
    bar.close()

    report = {"dataset": str(dataset.resolve()), "out": str(out.resolve()), "min_side": min_side,
              "fix": fix, "workers": workers, "splits": {}}
    for split, s in per_split.items():
        good = sorted(s["good"])
        _write_text(out / f"{split}.txt", "".join(f"{path} {label}\n" for _, _, path, label in good))
        bad = sorted(s["bad"], key=lambda e: e["path"])
        listed = Counter(cls for cls, *_ in good)
        report["splits"][split] = {
            "files": s["files"], "good": len(good), "fixed": sum("fixed" in e for e in bad),
            "classes": len(s["classes"]), "bad": bad,
            "reasons": dict(sorted(Counter(e["reason"] for e in bad).items())),
            "empty_classes": [c for c in s["classes"] if not listed[c]],
        }
    report["seconds"] = round(time.perf_counter() - start, 3)
    _write_text(out / REPORT_NAME, json.dumps(report, indent=1) + "\n")
    return report


def summary(report: dict) -> str:
    """The human summary the CLI prints: counts per split and per reason, and what to do next."""
    total = sum(s["files"] for s in report["splits"].values())
    lines = [f"scanned {total} files in {report['seconds']:.1f} s with {report['workers']} processes "
             f"(min side {report['min_side']} px)"]
    unfixed = 0
    for split, s in report["splits"].items():
        # every file counted once, so the parts add up to the total: good as found, fixed (re-encoded and
        # listed), bad (left out); the report's "good" counts the manifest lines, fixed files included
        bad = len(s["bad"]) - s["fixed"]
        fixed = f", {s['fixed']} fixed" if s["fixed"] else ""
        lines.append(f"{split}: {s['files']} files, {s['good'] - s['fixed']} good{fixed}, {bad} bad, "
                     f"{s['classes']} classes")
        fixed_by_reason = Counter(e["reason"] for e in s["bad"] if "fixed" in e)
        for reason, n in s["reasons"].items():
            done = fixed_by_reason[reason]
            note = "" if not done else " (fixed)" if done == n else f" ({done} fixed)"
            lines.append(f"  {n:6d}  {reason}{note}")
        readable = sum(n for reason, n in s["reasons"].items() if decodes_by_content(reason))
        if readable:
            lines.append(f"  {readable} of these (CMYK, or PNG/BMP/TIFF/WebP behind another name) decode with the CPU "
                         "loaders (--loader dali-cpu, torchvision), which train on them without a manifest")
        for cls in s["empty_classes"]:
            lines.append(f"  warning: {split}/{cls} has no good files")
        unfixed += bad
    out = Path(report["out"])
    names = ", ".join(f"{split}.txt" for split in report["splits"])
    lines.append(f"wrote {names} and {REPORT_NAME} to {out}")
    if unfixed:
        hint = "" if report["fix"] else " (--fix re-encodes those whose pixels can be read)"
        files_are = "file is" if unfixed == 1 else "files are"
        lines.append(f"{unfixed} bad {files_are} left out of the manifests{hint}; "
                     f"train on the good ones with `python -m rn50.train --manifest {out} ...`")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.scan", description=__doc__.split("\n")[0])
    p.add_argument("dataset", type=Path, metavar="DIR", help="dataset folder with train/ (and val/)")
    p.add_argument("--out", required=True, type=Path, help="folder for <split>.txt, scan_report.json and fixed/")
    p.add_argument("--min-side", type=int, default=8, help="shorter side below this is too small (default 8)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all usable cores)")
    p.add_argument("--fix", action="store_true",
                   help="re-encode readable bad files (PNG behind a .JPEG name, CMYK) into OUT/fixed/ and list them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        report = scan(args.dataset, args.out, args.min_side, args.workers, args.fix)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary(report))


if __name__ == "__main__":
    main()
