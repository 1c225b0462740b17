"""Turn the ILSVRC2012 downloads into the class-folder layout the loaders read, then verify it.

    python -m tools.prepare_imagenet --train SRC --val SRC --ground-truth GT --out DIR \
        [--mode symlink|move|copy] [--expect-train 1281167 --expect-val 50000 --expect-classes 1000] \
        [--workers K]

Sources:
  --train         ILSVRC2012_img_train.tar (a tar of per-class <wnid>.tar files), or its extracted folder:
                  either <wnid>/ sub-folders or the per-class <wnid>.tar files themselves.
  --val           ILSVRC2012_img_val.tar (flat ILSVRC2012_val_00000001.JPEG ...) or its extracted flat folder.
  --ground-truth  ILSVRC2012_devkit_t12.tar.gz, its extracted folder, or Kaggle's LOC_val_solution.csv.

Output: DIR/train/<wnid>/*.JPEG, DIR/val/<wnid>/*.JPEG and DIR/prepare_report.json.
Files from extracted folders are symlinked (absolute targets) by default, or moved / copied with --mode;
archives are always extracted, straight into the layout, and never changed. Sources are only ever
modified with --mode move.

This module reads the sources and places the files; the validation labels are tools/imagenet_labels.py's,
the --out check, the counts against the expected ones and the report tools/imagenet_verify.py's.

Exit codes: 0 prepared and the counts match the expected ones; 1 prepared but the counts differ (the data
is incomplete, the command was right); 2 the command or its inputs are wrong (one `error: ...` line).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Callable, Iterable

from rn50.config.errors import UserError
from tools.imagenet_labels import load_ground_truth
from tools.imagenet_verify import (EXPECT_CLASSES, EXPECT_TRAIN, EXPECT_VAL, check_out, format_table, verify,
                                   write_report)
from tools.progress import LOG_EVERY, bar as progress_bar

MODES = ("symlink", "move", "copy")
COPY_BUFFER = 1 << 20  # 1 MiB reads from tar streams; JPEGs average ~110 KB, so most fit in one read


# ---------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Counts placed files on a tools.progress bar (rate, and ETA when the total is known) on stderr, then
    prints a `<label>: done, N files in S s` line; safe to call from threads."""

    def __init__(self, label: str, total: int | None = None, stream: IO[str] | None = None,
                 log_every: float = LOG_EVERY):
        self.label, self.stream = label, stream or sys.stderr
        self.count = 0
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._bar = progress_bar(total, label, file=self.stream, log_every=log_every)

    def tick(self, n: int = 1) -> None:
        with self._lock:
            self.count += n
            self._bar.update(n)

    def done(self) -> None:
        with self._lock:
            self._bar.close()
        secs = time.perf_counter() - self.start
        print(f"{self.label}: done, {self.count:,} files in {secs:.0f} s ({self.count / max(secs, 1e-9):,.0f} files/s)",
              file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------------
# Sources


def source_kind(path: Path, flag: str) -> str:
    """What a --train/--val path is: 'tar' (an archive), 'dirs' (a folder of class sub-folders),
    'tars' (a folder of per-class .tar files) or 'flat' (a folder of image files)."""
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist; pass the ILSVRC2012 archive or its extracted folder")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise UserError(f"{flag} {path} is a file but not a tar archive; "
                            f"pass the ILSVRC2012 .tar or its extracted folder")
        return "tar"
    entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
    has_dirs = any(e.is_dir() for e in entries)
    has_tars = any(e.is_file() and e.name.endswith(".tar") for e in entries)
    if has_dirs and has_tars:
        raise UserError(f"{flag} {path} holds both sub-folders and .tar files, as a half-finished "
                        f"extraction does; pass a folder with only one of the two")
    if has_dirs:
        return "dirs"
    if has_tars:
        return "tars"
    if any(e.is_file() for e in entries):
        return "flat"
    raise UserError(f"{flag} {path} is an empty folder; pass the ILSVRC2012 archive or its extracted folder")


def list_files(folder: Path) -> list[str]:
    """Names of the (non-hidden) files in `folder`, sorted so runs are reproducible."""
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))


def member_name(member: tarfile.TarInfo) -> str | None:
    """The file name to write a tar member under, or None to skip it.

    Only regular files, and only their base name: a member called `../../x` or a tar symlink must
    never write outside the output folder (we place files ourselves rather than trust tar paths).
    """
    name = os.path.basename(member.name)
    if not member.isfile() or name in ("", ".", "..") or name.startswith("."):
        return None
    return name


# ---------------------------------------------------------------------------------------------------
# Placing files


def place(src: Path, dst: Path, mode: str) -> None:
    """Put one source file at `dst`: an absolute symlink, a move, or a copy."""
    if mode == "symlink":
        # Absolute, so the link stays valid whatever folder the loader is started from.
        os.symlink(src.absolute(), dst)
    elif mode == "move":
        shutil.move(src, dst)  # a rename on one filesystem, copy + delete across filesystems
    elif mode == "copy":
        shutil.copy2(src, dst)
    else:
        raise ValueError(f"unknown mode {mode!r}")


def write_stream(fileobj: IO[bytes], dst: Path) -> None:
    """Write a tar member's bytes to `dst`; 'xb' refuses to overwrite a file of the same name."""
    with open(dst, "xb") as out:
        shutil.copyfileobj(fileobj, out, COPY_BUFFER)


def extract_class_tar(tar: tarfile.TarFile, class_dir: Path, progress: Progress) -> int:
    """Write every image of one opened per-class tar into `class_dir`; returns the count."""
    class_dir.mkdir(exist_ok=True)
    n = 0
    for member in tar:
        name = member_name(member)
        if name is None:
            continue
        write_stream(tar.extractfile(member), class_dir / name)
        n += 1
        progress.tick()
    return n


def run_tasks(fn: Callable, tasks: Iterable, workers: int) -> list:
    """fn over tasks, on `workers` threads (file placement is I/O, which releases the GIL)."""
    tasks = list(tasks)
    if workers <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, tasks))


# ---------------------------------------------------------------------------------------------------
# Train


def prepare_train(src, out_train, mode: str = "symlink", workers: int = 8) -> int:
    """Fill `out_train`/<wnid>/ from any accepted train source; returns the number of images placed."""
    src, out_train = Path(src), Path(out_train)
    kind = train_kind(src)
    out_train.mkdir(parents=True, exist_ok=True)
    progress = Progress("train")
    if kind == "tar":
        n = extract_train_tar(src, out_train, progress)
    elif kind == "tars":
        n = extract_class_tars(src, out_train, progress, workers)
    else:
        n = place_class_dirs(src, out_train, mode, progress, workers)
    progress.done()
    return n


def train_kind(src: Path) -> str:
    """source_kind for --train, refusing a flat folder of images (it carries no class names)."""
    kind = source_kind(src, "--train")
    if kind == "flat":
        raise UserError(f"--train {src} holds image files but no class sub-folders or <wnid>.tar files; "
                        f"pass ILSVRC2012_img_train.tar or the folder it was extracted to")
    return kind


def extract_train_tar(src: Path, out_train: Path, progress: Progress) -> int:
    """Stream the tar of per-class tars: each inner <wnid>.tar is read straight from the outer stream
    ('r|' on both), so the 140 GB archive is read once, in order, with no intermediate copy."""
    n = classes = 0
    with tarfile.open(src, "r|*") as outer:
        for member in outer:
            name = member_name(member)
            if name is None or not name.endswith(".tar"):
                continue
            with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as inner:
                n += extract_class_tar(inner, out_train / name[: -len(".tar")], progress)
            classes += 1
    if classes == 0:
        raise UserError(f"--train {src} holds no per-class <wnid>.tar members; "
                        f"pass ILSVRC2012_img_train.tar or the folder it was extracted to")
    return n


def extract_class_tars(src: Path, out_train: Path, progress: Progress, workers: int) -> int:
    """A folder of per-class <wnid>.tar files: one streaming extraction per file, several at once."""
    def one(tar_path: Path) -> int:
        with tarfile.open(tar_path, "r|*") as tar:
            return extract_class_tar(tar, out_train / tar_path.name[: -len(".tar")], progress)

    tars = [src / name for name in list_files(src) if name.endswith(".tar")]
    return sum(run_tasks(one, tars, workers))


def place_class_dirs(src: Path, out_train: Path, mode: str, progress: Progress, workers: int) -> int:
    """A folder of <wnid>/ sub-folders: each image linked, moved or copied under the same names."""
    def one(class_dir: Path) -> int:
        dst = out_train / class_dir.name
        dst.mkdir(exist_ok=True)  # made even when empty, so the report flags the empty class
        names = list_files(class_dir)
        for name in names:
            place(class_dir / name, dst / name, mode)
            progress.tick()
        return len(names)

    dirs = sorted((Path(e.path) for e in os.scandir(src) if e.is_dir() and not e.name.startswith(".")),
                  key=lambda p: p.name)
    return sum(run_tasks(one, dirs, workers))


# ---------------------------------------------------------------------------------------------------
# Val


def plan_val(src, labels: dict[str, str]) -> tuple[str, list[tuple[str, str]]]:
    """Check the val images against the ground truth before anything is written.

    Returns (kind, [(file name, wnid), ...]) with kind 'tar' or 'flat'. Raises UserError when an image
    has no label or the ground truth lists a different number of images: a val split whose labels do
    not match its images gives silently wrong accuracy, the worst failure a data tool can have.
    """
    src = Path(src)
    kind = source_kind(src, "--val")
    if kind == "tar":
        # Random-access open reads only the headers (seeks past the data), so the check is cheap.
        with tarfile.open(src, "r:*") as tar:
            names = [n for n in (member_name(m) for m in tar.getmembers()) if n is not None]
    elif kind == "flat":
        names = list_files(src)
    else:
        raise UserError(f"--val {src} holds sub-folders or .tar files, not the flat "
                        f"ILSVRC2012_val_*.JPEG images; pass ILSVRC2012_img_val.tar or its extracted folder")
    unlabelled = [n for n in names if Path(n).stem not in labels]
    if unlabelled:
        raise UserError(f"{len(unlabelled)} of {len(names)} val images in {src} have no label in the "
                        f"ground truth (first: {unlabelled[0]}); pass the ILSVRC2012 validation images and "
                        f"the ground truth that belongs to them")
    if len(names) != len(labels):
        raise UserError(f"the ground truth labels {len(labels)} val images but {src} holds {len(names)}; "
                        f"pass the complete ILSVRC2012 validation set (re-download or re-extract it)")
    return kind, [(n, labels[Path(n).stem]) for n in names]


def prepare_val(src, out_val, plan: tuple[str, list[tuple[str, str]]], mode: str = "symlink",
                workers: int = 8) -> int:
    """Place the val images of `plan` (from plan_val) into `out_val`/<wnid>/; returns the count."""
    src, out_val = Path(src), Path(out_val)
    kind, items = plan
    wnid_of = dict(items)
    for wnid in sorted(set(wnid_of.values())):
        (out_val / wnid).mkdir(parents=True, exist_ok=True)
    progress = Progress("val", total=len(items))
    if kind == "tar":
        # Members in archive order, so the archive is read sequentially once.
        with tarfile.open(src, "r:*") as tar:
            for member in tar:
                name = member_name(member)
                if name is not None:
                    write_stream(tar.extractfile(member), out_val / wnid_of[name] / name)
                    progress.tick()
    else:
        def one(item: tuple[str, str]) -> None:
            name, wnid = item
            place(src / name, out_val / wnid / name, mode)
            progress.tick()

        run_tasks(one, items, workers)
    progress.done()
    return progress.count


# ---------------------------------------------------------------------------------------------------
# The whole job


def prepare_imagenet(train, val, ground_truth, out, mode: str = "symlink", workers: int = 8,
                     expect_train: int = EXPECT_TRAIN, expect_val: int = EXPECT_VAL,
                     expect_classes: int = EXPECT_CLASSES) -> dict:
    """Check every input, place train then val, verify; returns the report (also written to disk).

    All the checks that can fail on bad input run first, so a wrong --val or ground truth is reported
    in seconds rather than after an hour of extracting train.
    """
    train, val, out = Path(train), Path(val), Path(out)
    if mode not in MODES:
        raise UserError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    check_out(out)
    train_kind(train)
    labels = load_ground_truth(ground_truth)
    plan = plan_val(val, labels)
    prepare_train(train, out / "train", mode, workers)
    prepare_val(val, out / "val", plan, mode, workers)
    report = verify(out, expect_train, expect_val, expect_classes)
    report["sources"] = {"train": str(train.absolute()), "val": str(val.absolute()),
                         "ground_truth": str(Path(ground_truth).absolute()), "mode": mode}
    write_report(out, report)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.prepare_imagenet", description=__doc__.split("\n")[0],
                                epilog="Sources are only modified with --mode move.")
    p.add_argument("--train", required=True, type=Path,
                   help="ILSVRC2012_img_train.tar, or its extracted folder (<wnid>/ folders or <wnid>.tar files)")
    p.add_argument("--val", required=True, type=Path,
                   help="ILSVRC2012_img_val.tar, or its extracted flat folder")
    p.add_argument("--ground-truth", required=True, type=Path,
                   help="ILSVRC2012_devkit_t12.tar.gz, its extracted folder, or Kaggle's LOC_val_solution.csv")
    p.add_argument("--out", required=True, type=Path, help="output directory (train/ and val/ go here)")
    p.add_argument("--mode", choices=MODES, default="symlink",
                   help="how files from extracted folders are placed (default symlink); archives are extracted")
    p.add_argument("--expect-train", type=int, default=EXPECT_TRAIN, help=f"default {EXPECT_TRAIN:,}")
    p.add_argument("--expect-val", type=int, default=EXPECT_VAL, help=f"default {EXPECT_VAL:,}")
    p.add_argument("--expect-classes", type=int, default=EXPECT_CLASSES, help=f"default {EXPECT_CLASSES:,}")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads placing files (default min(8, cores))")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        report = prepare_imagenet(args.train, args.val, args.ground_truth, args.out, args.mode, args.workers,
                                  args.expect_train, args.expect_val, args.expect_classes)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_table(report))
    print(f"prepared {args.out} in {time.perf_counter() - start:.0f} s; "
          f"report in {args.out / 'prepare_report.json'}")
    if not report["ok"]:
        print("the prepared data differs from what was expected:", file=sys.stderr)
        for problem in report["problems"]:
            print(f"  {problem}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
