"""The dataset on disk: `DIR/train/<class>/*.JPEG` and `DIR/val/<class>/*.JPEG` (ImageNet layout).
Class folders may also hold .png, .bmp, .tif/.tiff and .webp files (any case of suffix).

Class indices come from the sorted class folder names of the training split, for every split, so a
validation folder lists its labels in the training order; a validation class that training lacks is an
error, never a silently shifted label. Every loader (DALI, torchvision, torchvision-gpu) reads the same list.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

from pipelines.errors import UserError

# Any case. Non-JPEG files are decoded by content: DALI's decoder and PIL (pipelines.jpeg_check.OTHER_FORMATS)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ImageList:
    root: Path  # the split folder
    classes: tuple[str, ...]  # training class names; index = label
    files: tuple[str, ...]  # absolute paths
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)

    @cached_property
    def identity(self) -> str:
        """A digest of the list (classes, each file's path relative to the split folder, or absolute outside
        it, and its label): a checkpoint keeps it, so a resume on another list is caught. Moving the whole
        dataset keeps it; adding, removing or renaming a file changes it."""
        root = str(self.root).rstrip("/") + "/"
        names = [f[len(root):] if f.startswith(root) else f for f in self.files]
        blob = json.dumps({"classes": list(self.classes), "files": names, "labels": list(self.labels)})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def class_counts(self) -> tuple[int, ...]:
        """Images per class, by label."""
        counts = [0] * len(self.classes)
        for label in self.labels:
            counts[label] += 1
        return tuple(counts)


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir())


def _images_in(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _split_dir(data_dir: Path, split: str) -> Path:
    if not data_dir.is_dir():
        raise UserError(
            f"data folder {data_dir} does not exist; pass --data DIR with DIR/train/<class>/*.JPEG "
            "(make a small one with `python -m tools.make_dataset --out DIR --classes 10 "
            "--train-per-class 100 --val-per-class 20 --seed 0`)"
        )
    split_dir = data_dir / split
    if not split_dir.is_dir():
        if _holds_class_folders(data_dir):  # a folder of classes not split yet: the tool that splits it
            raise UserError(f"{split_dir} is missing: {data_dir} holds class folders directly; split it into train/ "
                            f"and val/ with `python -m tools.split {data_dir} --out SPLIT --val-fraction 0.2` and "
                            "pass --data SPLIT")
        raise UserError(f"{split_dir} is missing; the data folder needs train/ and val/, each with one folder per class")
    return split_dir


def _holds_class_folders(data_dir: Path) -> bool:
    """Whether a folder other than train/ and val/ directly holds image files (IMAGE_SUFFIXES): class folders."""
    return any(any(f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() for f in d.iterdir())
               for d in _class_dirs(data_dir) if d.name not in SPLITS)


@lru_cache(maxsize=8)
def class_names(data_dir: str) -> tuple[str, ...]:
    """Sorted class folder names of the training split."""
    names = tuple(p.name for p in _class_dirs(_split_dir(Path(data_dir), "train")))
    if not names:
        raise UserError(f"{Path(data_dir) / 'train'} has no class folders; put each class's JPEGs in train/<class>/")
    return names


@lru_cache(maxsize=8)
def list_split(data_dir: str, split: str, manifest: str | None = None) -> ImageList:
    """Every image file of one split (IMAGE_SUFFIXES, any case) with its label, as absolute paths sorted by
    class folder then name; validates the layout once per process. With `manifest` (a folder written by
    `python -m tools.scan`), the files listed there instead."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    classes = class_names(data_dir)
    if manifest is not None:
        return read_manifest(Path(manifest) / f"{split}.txt", _split_dir(Path(data_dir), split), classes)
    split_dir = _split_dir(Path(data_dir), split)
    index = {name: i for i, name in enumerate(classes)}
    files, labels = [], []
    for class_dir in _class_dirs(split_dir):
        if class_dir.name not in index:
            raise UserError(
                f"{class_dir} is a class that {Path(data_dir) / 'train'} does not have; "
                "validation classes must be a subset of the training classes (rename or remove it)"
            )
        images = _images_in(class_dir)
        if not images and split == "train":
            raise UserError(f"class folder {class_dir} holds no .JPEG files (nor .png, .bmp, .tif, .webp); "
                            "add images or remove the folder")
        files += [str(p) for p in images]
        labels += [index[class_dir.name]] * len(images)
    if not files:
        raise UserError(f"{split_dir} holds no .JPEG files (nor .png, .bmp, .tif, .webp); "
                        f"put images in {split_dir}/<class>/")
    return ImageList(split_dir, classes, tuple(files), tuple(labels))


def read_manifest(path: Path, split_dir: Path, classes: tuple[str, ...]) -> ImageList:
    """A scan manifest: one `relative/path label` line per good file (DALI's file_list format); relative
    paths are under the split folder, absolute ones (files the scanner re-encoded) are kept as they are."""
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist; write it with `python -m tools.scan DATA --out "
                        f"{path.parent}`")
    files, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, _, label = line.rpartition(" ")
        if not name or not label.isdigit() or int(label) >= len(classes):
            raise UserError(f"{path} line {number} is not `path label` with a label below {len(classes)}: "
                            f"{line!r}; write the manifest again with `python -m tools.scan`")
        files.append(name if Path(name).is_absolute() else str(split_dir / name))
        labels.append(int(label))
    if not files:
        raise UserError(f"manifest {path} lists no files; scan the data again or fix the folder")
    return ImageList(split_dir, classes, tuple(files), tuple(labels))


def _stopping(problems: list[tuple[str, str]], by_content: bool) -> list[tuple[str, str]]:
    """The problems that stop a loader: all of them for the GPU decoders ("dali", "torchvision-gpu"); for
    the loaders that decode by content (`by_content`: their registry record's decodes_by_content, "dali-cpu",
    "dali-hybrid", "torchvision") all but CMYK JPEGs and PNG/BMP/TIFF/WebP data behind another name."""
    from pipelines.jpeg_check import decodes_by_content

    if not by_content:
        return problems
    return [(path, reason) for path, reason in problems if not decodes_by_content(reason)]


def _accepted_line(accepted: list[tuple[str, str]], split: str, rank: int, world_size: int) -> str:
    """One line: e.g. "train: 2 files decode by content: 1 CMYK JPEG, 1 PNG behind a .JPEG name"."""
    from collections import Counter

    kinds = Counter("CMYK JPEG" if reason.startswith("CMYK") else
                    reason.replace(" data behind a JPEG name", " behind a .JPEG name").replace(" data behind ", " behind ")
                    for _, reason in accepted)
    what = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    share = f" (rank {rank}'s share)" if world_size > 1 else ""
    files = "file decodes" if len(accepted) == 1 else "files decode"
    return (f"note: {split}{share}: {len(accepted)} {files} by content: {what}; the CPU loaders read them "
            f"(first: {accepted[0][0]}); training goes on")


@lru_cache(maxsize=8)  # once per process and split: the harness builds many loaders over the same files
def check_files(image_list: ImageList, rank: int, world_size: int, decodes_by_content: bool = False,
                every_split: bool = True) -> None:
    """Pre-flight: one bad file stops a DALI pipeline mid-epoch, hours in. Each rank checks its share
    of the headers (about 15 us a file) and stops before training, naming the file and the fix.
    When it stops, the count it gives covers this rank's share of every split (train and val), so
    "and N more" is every other bad file the user has to deal with, not only those of this split;
    `every_split` False (rn50.evaluate, which reads the validation split alone) counts and names this
    split only. `decodes_by_content`: the loader kind's record says whether it does (build_loader passes
    REGISTRY[kind].decodes_by_content). Those that do ("dali-cpu",
    "dali-hybrid", "torchvision") read CMYK JPEGs and PNG/BMP/TIFF/WebP data behind a .JPEG name: one line on
    stderr counts them and training goes on. The GPU decoders ("dali", "torchvision-gpu") still stop on them
    (unverified on nvJPEG)."""
    import sys

    from pipelines.jpeg_check import find_header_problems

    found = find_header_problems(image_list.files[rank::world_size])
    problems = _stopping(found, decodes_by_content)
    if len(problems) < len(found):
        stopping = set(problems)
        accepted = [p for p in found if p not in stopping]
        print(_accepted_line(accepted, image_list.root.name, rank, world_size), file=sys.stderr, flush=True)
    if not problems:
        return
    data_dir, this_split = image_list.root.parent, image_list.root.name
    per_split = {this_split: len(problems)}
    for split in SPLITS:  # the other split too, on the error path only: one more pass over its headers
        if split == this_split or not every_split:
            continue
        try:
            other = list_split(str(data_dir), split)
        except UserError:  # a missing or odd split is reported when its own loader is built
            continue
        per_split[split] = len(_stopping(find_header_problems(other.files[rank::world_size]), decodes_by_content))
    per_split = {split: per_split[split] for split in SPLITS if split in per_split}  # train first
    total = sum(per_split.values())
    path, reason = problems[0]
    others = ""
    if total > 1:
        where = ", ".join(f"{n} in {split}" for split, n in per_split.items() if n)
        share = f" of rank {rank}'s share" if world_size > 1 else ""
        others = f" and {total - 1} more ({total} bad files{share}: {where})"
    use, run = ("trained on", "train") if every_split else ("read", "pass")
    raise UserError(
        f"{path} cannot be {use} ({reason}){others}; run `python -m tools.scan {data_dir} --out SCAN` "
        f"and {run} --manifest SCAN (its list of good files), or remove the {'files' if total > 1 else 'file'}"
    )
