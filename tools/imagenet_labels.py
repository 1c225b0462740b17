"""tools.prepare_imagenet's validation labels: {val image stem (ILSVRC2012_val_00000001): wnid}, from the
ILSVRC2012 devkit (its .tar.gz or extracted folder: meta.mat and the ground-truth file) or from Kaggle's
LOC_val_solution.csv."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

from rn50.config.errors import UserError

DEVKIT_META = "data/meta.mat"
DEVKIT_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_HEADER = ["ImageId", "PredictionString"]


def load_ground_truth(path) -> dict[str, str]:
    """Read any of the accepted ground-truth forms; returns {val image stem: wnid}."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--ground-truth {path} does not exist; pass ILSVRC2012_devkit_t12.tar.gz, "
                        f"its extracted folder, or Kaggle's LOC_val_solution.csv")
    if path.is_dir():
        meta, truth = read_devkit_folder(path)
    elif path.name.lower().endswith(".csv"):
        return read_kaggle_csv(path)
    elif tarfile.is_tarfile(path):
        meta, truth = read_devkit_archive(path)
    else:
        raise UserError(f"--ground-truth {path} is neither a devkit archive or folder nor a .csv file; "
                        f"pass ILSVRC2012_devkit_t12.tar.gz, its extracted folder, "
                        f"or Kaggle's LOC_val_solution.csv")
    return devkit_labels(truth, parse_meta_mat(meta, source=path), source=path)


def read_devkit_folder(path: Path) -> tuple[bytes, str]:
    """(meta.mat bytes, ground-truth text) from an extracted devkit, given its folder or the one above."""
    for root in (path, path / "ILSVRC2012_devkit_t12"):
        meta, truth = root / DEVKIT_META, root / DEVKIT_GROUND_TRUTH
        if meta.is_file() and truth.is_file():
            return meta.read_bytes(), truth.read_text()
    raise UserError(f"--ground-truth {path} is a folder without {DEVKIT_META} and {DEVKIT_GROUND_TRUTH}; "
                    f"pass the extracted ILSVRC2012_devkit_t12 folder (or the .tar.gz itself)")


def read_devkit_archive(path: Path) -> tuple[bytes, str]:
    """(meta.mat bytes, ground-truth text) from the devkit tar(.gz), matched by path suffix so any
    top-level folder name works; one streaming pass, nothing written to disk."""
    found: dict[str, bytes] = {}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            for want in (DEVKIT_META, DEVKIT_GROUND_TRUTH):
                if member.isfile() and (member.name == want or member.name.endswith("/" + want)):
                    found[want] = tar.extractfile(member).read()
    missing = [want for want in (DEVKIT_META, DEVKIT_GROUND_TRUTH) if want not in found]
    if missing:
        raise UserError(f"--ground-truth {path} has no {' or '.join(missing)}; "
                        f"pass ILSVRC2012_devkit_t12.tar.gz (the 'Development kit (Task 1 & 2)' download)")
    return found[DEVKIT_META], found[DEVKIT_GROUND_TRUTH].decode()


def parse_meta_mat(data: bytes, source="meta.mat") -> dict[int, str]:
    """{ILSVRC2012_ID: wnid} for the leaf synsets of the devkit's meta.mat.

    meta.mat also lists the WordNet ancestors of the 1000 classes (num_children > 0); those are
    never labels, and skipping them keeps the map to exactly the classes images can have.
    Fields are read by name, not position, so a re-saved file with another field order still works.
    """
    try:
        from scipy.io import loadmat  # here: only the devkit form needs it
    except ImportError:
        raise UserError("reading the devkit's meta.mat needs scipy; `pip install scipy`, "
                        "or pass Kaggle's LOC_val_solution.csv as --ground-truth") from None
    import numpy as np

    try:
        synsets = loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        synsets = np.atleast_1d(synsets)
        fields = {name: synsets[name] for name in ("ILSVRC2012_ID", "WNID", "num_children")}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{source}: meta.mat has no readable `synsets` struct with ILSVRC2012_ID, WNID and "
                        f"num_children ({e}); pass an unmodified ILSVRC2012 devkit") from None
    id_to_wnid: dict[int, str] = {}
    for ident, wnid, children in zip(fields["ILSVRC2012_ID"], fields["WNID"], fields["num_children"]):
        if int(children) == 0:
            id_to_wnid[int(ident)] = str(wnid)
    if not id_to_wnid:
        raise UserError(f"{source}: meta.mat lists no leaf synsets (num_children == 0); "
                        f"pass an unmodified ILSVRC2012 devkit")
    return id_to_wnid


def devkit_labels(text: str, id_to_wnid: dict[int, str], source="ground truth") -> dict[str, str]:
    """{ILSVRC2012_val_%08d: wnid}: line i of the ground-truth file is the ILSVRC2012_ID of val image i."""
    labels: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ident = int(line)
        except ValueError:
            raise UserError(f"{source}: line {i} of {DEVKIT_GROUND_TRUTH} is {line!r}, not a class id; "
                            f"pass an unmodified ILSVRC2012 devkit") from None
        if ident not in id_to_wnid:
            raise UserError(f"{source}: line {i} of {DEVKIT_GROUND_TRUTH} names class id {ident}, which "
                            f"meta.mat does not list as a leaf synset; pass an unmodified ILSVRC2012 devkit")
        labels[f"ILSVRC2012_val_{i:08d}"] = id_to_wnid[ident]
    return labels


def read_kaggle_csv(path: Path) -> dict[str, str]:
    """{ImageId: wnid} from Kaggle's LOC_val_solution.csv; the wnid is the first word of each
    PredictionString (the rest are boxes, each repeating a wnid, not needed for classification)."""
    labels: dict[str, str] = {}
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != KAGGLE_HEADER:
            raise UserError(f"--ground-truth {path} starts with {header}, not {','.join(KAGGLE_HEADER)}; "
                            f"pass Kaggle's LOC_val_solution.csv or the ILSVRC2012 devkit")
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            words = row[1].split() if len(row) == 2 else []
            if not row[0] or not words:
                raise UserError(f"--ground-truth {path} line {line} is not `ImageId,wnid ...`; "
                                f"pass an unmodified LOC_val_solution.csv")
            labels[row[0]] = words[0]
    return labels
