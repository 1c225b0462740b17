"""tools.prepare_imagenet on a tiny fake ILSVRC2012: every source form, every mode, labels, verify, errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rn50.config.errors import UserError
from tools.imagenet_labels import load_ground_truth, parse_meta_mat
from tools.imagenet_verify import verify
from tools.prepare_imagenet import Progress, member_name, prepare_imagenet, run_tasks

ROOT = Path(__file__).resolve().parents[2]

# Three classes with unequal sizes, so a count that is right by accident is unlikely.
TRAIN = {"n01440764": 3, "n01443537": 2, "n01484850": 4}
N_TRAIN = sum(TRAIN.values())
# ILSVRC2012_ID per class, deliberately NOT in sorted-wnid order: labels must come from meta.mat.
IDS = {"n01484850": 1, "n01440764": 2, "n01443537": 3}
PARENT = (1001, "n01439121", "cyprinid", 2)  # a non-leaf synset: never a label
# Class of val image i (1-based); every class has at least one val image.
VAL = ["n01443537", "n01440764", "n01484850", "n01440764", "n01484850"]
N_VAL, N_CLASSES = len(VAL), len(TRAIN)
EXPECT = ["--expect-train", str(N_TRAIN), "--expect-val", str(N_VAL), "--expect-classes", str(N_CLASSES)]


def jpeg(seed: int) -> bytes:
    """A distinct 8x8 JPEG, so a file landing in the wrong place is detectable by its bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            add_bytes(tar, name, data)
    return buf.getvalue()


def meta_mat() -> bytes:
    """A meta.mat like the devkit's: a `synsets` struct array (column), non-leaf first."""
    from scipy.io import savemat

    rows = [PARENT] + [(ident, wnid, f"words of {wnid}", 0) for wnid, ident in IDS.items()]
    synsets = np.empty((len(rows), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                              ("num_children", "O")])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    return buf.getvalue()


@pytest.fixture
def fake(tmp_path) -> dict:
    """Every source form of the fake data set, plus the expected bytes of each output file."""
    src = tmp_path / "src"
    train_images = {wnid: {f"{wnid}_{k}.JPEG": jpeg(100 * c + k) for k in range(n)}
                    for c, (wnid, n) in enumerate(TRAIN.items())}
    val_images = {val_name(i): jpeg(10_000 + i) for i in range(1, N_VAL + 1)}

    train_dir = src / "train_extracted"  # <wnid>/ sub-folders
    train_tars = src / "train_tars"  # per-class <wnid>.tar files
    val_dir = src / "val_extracted"
    for d in (train_dir, train_tars, val_dir):
        d.mkdir(parents=True)
    for wnid, files in train_images.items():
        (train_dir / wnid).mkdir()
        for name, data in files.items():
            (train_dir / wnid / name).write_bytes(data)
        (train_tars / f"{wnid}.tar").write_bytes(tar_bytes(files))
    train_tar = src / "ILSVRC2012_img_train.tar"
    train_tar.write_bytes(tar_bytes({f"{wnid}.tar": (train_tars / f"{wnid}.tar").read_bytes()
                                     for wnid in TRAIN}))
    for name, data in val_images.items():
        (val_dir / name).write_bytes(data)
    val_tar = src / "ILSVRC2012_img_val.tar"
    val_tar.write_bytes(tar_bytes(val_images))

    truth = "".join(f"{IDS[wnid]}\n" for wnid in VAL)
    csv_path = src / "LOC_val_solution.csv"
    # Kaggle's rows are in no particular order; the box list repeats the wnid.
    csv_path.write_text("ImageId,PredictionString\n" + "".join(
        f"{val_name(i)[:-5]},{VAL[i - 1]} 1 2 30 40 {VAL[i - 1]} 5 6 7 8 \n" for i in reversed(range(1, N_VAL + 1))))
    out = dict(src=src, train_dir=train_dir, train_tars=train_tars, train_tar=train_tar, val_dir=val_dir,
               val_tar=val_tar, csv=csv_path, truth=truth, train_images=train_images, val_images=val_images)
    try:
        mat = meta_mat()
    except ImportError:  # scipy missing: the devkit forms cannot be built, the CSV ones still run
        return out
    devkit_dir = src / "devkit" / "ILSVRC2012_devkit_t12"
    (devkit_dir / "data").mkdir(parents=True)
    (devkit_dir / "data" / "meta.mat").write_bytes(mat)
    (devkit_dir / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(truth)
    devkit_tar = src / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(devkit_tar, "w:gz") as tar:
        tar.add(devkit_dir, arcname="ILSVRC2012_devkit_t12")
    out.update(devkit_dir=devkit_dir, devkit_tar=devkit_tar)
    return out


def needs_scipy():
    pytest.importorskip("scipy", reason="the devkit's meta.mat is read with scipy")


def expected_layout(fake) -> dict[str, bytes]:
    """{relative output path: bytes} that a correct preparation produces."""
    want = {f"train/{wnid}/{name}": data for wnid, files in fake["train_images"].items()
            for name, data in files.items()}
    want.update({f"val/{VAL[i - 1]}/{val_name(i)}": fake["val_images"][val_name(i)]
                 for i in range(1, N_VAL + 1)})
    return want


def output_files(out: Path) -> dict[str, Path]:
    return {p.relative_to(out).as_posix(): p for split in ("train", "val") for p in (out / split).rglob("*")
            if not p.is_dir()}


def assert_layout(fake, out: Path) -> dict[str, Path]:
    files = output_files(out)
    want = expected_layout(fake)
    assert sorted(files) == sorted(want)
    for rel, path in files.items():
        assert path.read_bytes() == want[rel], rel
    return files


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.prepare_imagenet", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# --- ground truth -------------------------------------------------------------------------------------


def test_meta_mat_maps_leaf_ids_and_ignores_non_leaf_synsets():
    needs_scipy()
    assert parse_meta_mat(meta_mat()) == {ident: wnid for wnid, ident in IDS.items()}


def test_every_ground_truth_form_gives_the_same_labels(fake):
    want = {val_name(i)[:-5]: VAL[i - 1] for i in range(1, N_VAL + 1)}
    assert load_ground_truth(fake["csv"]) == want
    needs_scipy()
    assert load_ground_truth(fake["devkit_tar"]) == want
    assert load_ground_truth(fake["devkit_dir"]) == want
    assert load_ground_truth(fake["devkit_dir"].parent) == want  # the folder above works too


def test_ground_truth_naming_a_non_leaf_synset_is_refused(fake):
    needs_scipy()
    truth = fake["devkit_dir"] / "data" / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text(fake["truth"].replace(f"{IDS[VAL[0]]}\n", f"{PARENT[0]}\n", 1))
    with pytest.raises(UserError, match="leaf synset"):
        load_ground_truth(fake["devkit_dir"])


def test_tar_members_are_written_by_base_name_only():
    info = tarfile.TarInfo("../../etc/evil.JPEG")
    assert member_name(info) == "evil.JPEG"
    link = tarfile.TarInfo("x.JPEG")
    link.type = tarfile.SYMTYPE
    assert member_name(link) is None


# --- sources and modes ----------------------------------------------------------------------------------


def test_archives_extract_straight_into_the_layout(fake, tmp_path):
    needs_scipy()
    out = tmp_path / "out"
    report = prepare_imagenet(fake["train_tar"], fake["val_tar"], fake["devkit_tar"], out, workers=2,
                              expect_train=N_TRAIN, expect_val=N_VAL, expect_classes=N_CLASSES)
    files = assert_layout(fake, out)
    assert not any(p.is_symlink() for p in files.values())  # extracted, whatever the mode
    assert report["ok"] and report["problems"] == []
    assert sorted(p.name for p in out.iterdir()) == ["prepare_report.json", "train", "val"]  # no temp copy


def test_folder_of_class_tars_and_csv_ground_truth(fake, tmp_path):
    out = tmp_path / "out"
    report = prepare_imagenet(fake["train_tars"], fake["val_tar"], fake["csv"], out, workers=2,
                              expect_train=N_TRAIN, expect_val=N_VAL, expect_classes=N_CLASSES)
    assert_layout(fake, out)
    assert report["ok"]


def test_extracted_folders_are_symlinked_to_their_sources_by_default(fake, tmp_path):
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in fake["src"].rglob("*") if p.is_file()}
    prepare_imagenet(fake["train_dir"], fake["val_dir"], fake["csv"], out, workers=2,
                     expect_train=N_TRAIN, expect_val=N_VAL, expect_classes=N_CLASSES)
    files = assert_layout(fake, out)
    for rel, path in files.items():
        split, wnid, name = rel.split("/")
        source = fake["train_dir"] / wnid / name if split == "train" else fake["val_dir"] / name
        assert path.is_symlink() and os.readlink(path) == str(source.absolute())
    assert {p: p.read_bytes() for p in fake["src"].rglob("*") if p.is_file()} == before  # sources untouched


def test_move_mode_moves_and_copy_mode_copies(fake, tmp_path):
    out = tmp_path / "copied"
    prepare_imagenet(fake["train_dir"], fake["val_dir"], fake["csv"], out, mode="copy", workers=1,
                     expect_train=N_TRAIN, expect_val=N_VAL, expect_classes=N_CLASSES)
    assert not any(p.is_symlink() for p in assert_layout(fake, out).values())
    assert len(list(fake["val_dir"].iterdir())) == N_VAL  # copy leaves the sources

    out = tmp_path / "moved"
    prepare_imagenet(fake["train_dir"], fake["val_dir"], fake["csv"], out, mode="move", workers=2,
                     expect_train=N_TRAIN, expect_val=N_VAL, expect_classes=N_CLASSES)
    assert not any(p.is_symlink() for p in assert_layout(fake, out).values())
    assert list(fake["val_dir"].iterdir()) == []
    assert not any(p.is_file() for p in fake["train_dir"].rglob("*"))


# --- verification and the CLI ---------------------------------------------------------------------------


def test_cli_counts_match_exit_0_and_write_the_report(fake, tmp_path):
    needs_scipy()
    out = tmp_path / "out"
    r = run("--train", fake["train_tar"], "--val", fake["val_dir"], "--ground-truth", fake["devkit_dir"],
            "--out", out, "--workers", "2", *EXPECT)
    assert r.returncode == 0, r.stderr
    assert "train: done" in r.stderr and "val: done" in r.stderr  # progress goes to stderr
    assert "train" in r.stdout and f"{N_TRAIN:>11,}" in r.stdout
    assert_layout(fake, out)
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["ok"] and report["splits"]["train"]["images"] == N_TRAIN
    assert report["splits"]["val"]["per_class"] == {w: VAL.count(w) for w in sorted(TRAIN)}
    assert report["sources"]["mode"] == "symlink"


def test_cli_counts_differ_exit_1_and_say_what_differs(fake, tmp_path):
    out = tmp_path / "out"
    r = run("--train", fake["train_dir"], "--val", fake["val_dir"], "--ground-truth", fake["csv"],
            "--out", out)  # ImageNet's default expectations: the fake set is far smaller
    assert r.returncode == 1, r.stderr
    assert f"train has {N_TRAIN} images, expected 1,281,167" in r.stderr
    assert f"val has {N_CLASSES} classes, expected 1,000" in r.stderr
    assert not json.loads((out / "prepare_report.json").read_text())["ok"]


def test_verify_flags_empty_classes_and_val_classes_train_lacks(tmp_path):
    for rel in ("train/n1/a.JPEG", "train/n2/b.JPEG", "val/n1/c.JPEG", "val/n3/d.JPEG"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "train" / "n4").mkdir()
    report = verify(tmp_path, expect_train=2, expect_val=2, expect_classes=3)
    assert not report["ok"]
    assert report["val_classes_not_in_train"] == ["n3"]
    assert report["splits"]["train"]["empty_classes"] == ["n4"]
    assert report["splits"]["train"]["classes"] == 3 and report["splits"]["val"]["images"] == 2


def corrupt(fake, tmp_path, case: str) -> list:
    """CLI arguments that are wrong in the way `case` names (sources otherwise fine)."""
    args = {"--train": fake["train_dir"], "--val": fake["val_dir"], "--ground-truth": fake["csv"],
            "--out": tmp_path / "out"}
    if case == "missing train":
        args["--train"] = tmp_path / "nope"
    elif case == "unknown ground truth":
        args["--ground-truth"] = tmp_path / "labels.txt"
        args["--ground-truth"].write_text("1\n2\n")
    elif case == "csv with another header":
        args["--ground-truth"] = tmp_path / "other.csv"
        args["--ground-truth"].write_text("id,label\nILSVRC2012_val_00000001,n01440764\n")
    elif case == "val image without a label":
        (fake["val_dir"] / "ILSVRC2012_val_00000099.JPEG").write_bytes(jpeg(99))
    elif case == "ground truth count differs":
        (fake["val_dir"] / val_name(N_VAL)).unlink()
    elif case == "train is a flat folder":
        args["--train"] = fake["val_dir"]
    elif case == "out not empty":
        (tmp_path / "out" / "val" / "x").mkdir(parents=True)
    elif case == "bad workers":
        return [*sum(([k, v] for k, v in args.items()), []), "--workers", "0"]
    return sum(([k, v] for k, v in args.items()), [])


@pytest.mark.parametrize("case, words", [
    ("missing train", "does not exist"),
    ("unknown ground truth", "neither a devkit"),
    ("csv with another header", "LOC_val_solution.csv"),
    ("val image without a label", "no label"),
    ("ground truth count differs", "labels 5 val images but"),
    ("train is a flat folder", "no class sub-folders"),
    ("out not empty", "not empty"),
    ("bad workers", "--workers"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(fake, tmp_path, case, words):
    r = run(*corrupt(fake, tmp_path, case))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    if case != "out not empty":  # inputs are all checked before anything is placed
        assert not (tmp_path / "out" / "train").exists() or not any((tmp_path / "out" / "train").iterdir())


def test_progress_prints_plain_lines_in_a_log_from_any_thread():
    stream = io.StringIO()  # not a terminal: whole lines (tools.progress), no carriage returns
    progress = Progress("train", stream=stream, log_every=0)
    run_tasks(lambda _: progress.tick(), range(10), workers=3)
    progress.done()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and progress.count == 10
    assert lines[-2].startswith("train: 10 files in ") and "files/s" in lines[-2]  # the bar's last line
    assert lines[-1].startswith("train: done, 10 files in ")
