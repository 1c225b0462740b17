"""tools.split (stratified, deterministic link splits), tools.stats (counts, sizes, exact mean/std) and the
recipe's `normalize` as every loader applies it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import build_loader
from pipelines.augmentation import MEAN, STD, Augmentation
from pipelines.errors import UserError
from rn50.config.recipe import read_preset
from tools.split import split, val_count
from tools.stats import stats

ROOT = Path(__file__).resolve().parents[2]
SIZES = {"a": 10, "b": 5, "c": 2, "d": 1}


def cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture()
def classes(tmp_path):
    """A folder of class folders (names only matter to the split), mixed suffixes, one non-image file."""
    root = tmp_path / "src"
    suffixes = [".jpg", ".JPEG", ".png", ".bmp", ".tif", ".TIFF", ".webp"]
    for cls, n in SIZES.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            (root / cls / f"{cls}{i}{suffixes[i % len(suffixes)]}").write_bytes(f"{cls}{i}".encode())
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def listing(out: Path) -> dict:
    return {part: {c.name: sorted(f.name for f in c.iterdir()) for c in sorted((out / part).iterdir())}
            for part in ("train", "val")}


def test_split_counts_add_up_stratified_and_links_point_at_the_originals(classes, tmp_path):
    out = tmp_path / "out"
    counts = split(classes, out, 0.25, seed=0, progress=False)
    got = listing(out)
    assert counts["train"] + counts["val"] == sum(SIZES.values()) and counts["skipped"] == 1
    for cls, n in SIZES.items():
        train, val = got["train"][cls], got["val"][cls]
        assert len(val) == val_count(n, 0.25) and len(train) + len(val) == n and not set(train) & set(val)
        assert sorted(train + val) == sorted(p.name for p in (classes / cls).iterdir() if p.suffix != ".txt")
    assert [len(got["val"][c]) for c in SIZES] == [2, 1, 1, 0]  # round(2.5)=2, round(1.25)=1, at least 1, none of 1
    for f in (out / "train").rglob("*"):
        if f.is_file():
            assert f.is_symlink() and os.path.isabs(os.readlink(f))
            assert Path(os.readlink(f)) == (classes / f.parent.name / f.name).absolute()


def test_split_is_deterministic_per_seed(classes, tmp_path):
    first = listing(Path(split(classes, tmp_path / "1", 0.3, seed=7, progress=False) and tmp_path / "1"))
    again = listing(Path(split(classes, tmp_path / "2", 0.3, seed=7, progress=False) and tmp_path / "2"))
    other = listing(Path(split(classes, tmp_path / "3", 0.3, seed=8, progress=False) and tmp_path / "3"))
    assert first == again and first != other


def test_val_count_rule():
    assert [val_count(n, 0.2) for n in (0, 1, 2, 3, 5, 10, 11)] == [0, 0, 1, 1, 1, 2, 2]
    assert val_count(2, 0.9) == 1 and val_count(10, 0.99) == 9  # a class keeps a training file


def test_split_copy_and_cli(classes, tmp_path):
    out = tmp_path / "copied"
    ran = cli("tools.split", classes, "--out", out, "--val-fraction", "0.25", "--seed", "0", "--copy")
    assert ran.returncode == 0, ran.stderr
    assert "into 14 train + 4 val (copies)" in ran.stdout and "class d" in ran.stdout
    assert "left out 1 entry that is not an image file" in ran.stdout  # one notes.txt: not "1 entries"
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) == 18 and not any(f.is_symlink() for f in files)


@pytest.mark.parametrize("case", ["not empty", "fraction", "inside", "already split", "missing", "no images"])
def test_split_refusals_are_one_error_line(classes, tmp_path, case):
    out, args = tmp_path / "out", ["--val-fraction", "0.25"]
    source = classes
    if case == "not empty":
        out.mkdir()
        (out / "x").write_text("")
    elif case == "fraction":
        args = ["--val-fraction", "1.0"]
    elif case == "inside":
        out = classes / "split"
    elif case == "already split":
        source = tmp_path / "ds"
        (source / "train" / "a").mkdir(parents=True)
        (source / "val" / "a").mkdir(parents=True)
    elif case == "missing":
        source = tmp_path / "missing"
    else:
        source = tmp_path / "empty"
        (source / "a").mkdir(parents=True)
    ran = cli("tools.split", source, "--out", out, *args)
    assert ran.returncode == 2 and ran.stdout == ""
    assert ran.stderr.startswith("error: ") and len(ran.stderr.strip().splitlines()) == 1, ran.stderr
    if case != "not empty":
        assert not out.exists() or not any(out.iterdir())


def test_an_empty_class_is_left_out_of_the_split_and_stats_never_calls_it_balanced(tmp_path):
    """Issue 38, 4: split made an empty train/<class>/ (which rn50.train refuses) and stats called a 0-image
    class balanced (imbalance 1.00). Now split leaves it out on one line, a class of one image goes to train
    only, rn50.train's listing takes the split, and stats says the imbalance is infinite."""
    from pipelines import list_data
    from pipelines.folder import list_split
    from tools.stats import summary

    mine = tmp_path / "mine"
    for cls in ("a", "b"):
        (mine / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 12), (40 * i, 9, 99)).save(mine / cls / f"{cls}{i}.png")
    (mine / "empty_class").mkdir()
    report = stats(mine, workers=1, progress=False)
    images = report["splits"]["images"]
    assert images["imbalance"] is None and images["empty_classes"] == ["empty_class"]  # was 1.0
    line = summary(report).splitlines()[0]
    assert "infinite (1 class has no images)" in line and "1.00" not in line, line

    (mine / "c").mkdir()
    Image.new("RGB", (16, 12)).save(mine / "c" / "c0.png")
    out = tmp_path / "split"
    ran = cli("tools.split", mine, "--out", out, "--val-fraction", "0.25")
    assert ran.returncode == 0, ran.stderr
    assert not (out / "train" / "empty_class").exists() and not (out / "val" / "empty_class").exists()
    said = [line for line in ran.stdout.splitlines() if "(empty_class)" in line]
    assert len(said) == 1 and said[0].startswith("left out 1 class folder with no image file"), ran.stdout
    assert "class c has 1 image: it goes to train only, so validation cannot count it" in ran.stdout
    assert "of 3 classes" in ran.stdout
    list_split.cache_clear()
    train, val = list_data(out, "train"), list_data(out, "val")  # what rn50.train lists (and refused before)
    assert train.images.classes == ("a", "b", "c") and train.images.class_counts() == (3, 3, 1)
    assert val.images.class_counts() == (1, 1, 0)


# ---- tools.stats ----

@pytest.fixture()
def pixel_data(tmp_path):
    """train/ with lossless PNGs of known random pixels (one grayscale, one RGBA), and a val/."""
    rng = np.random.default_rng(0)
    arrays = {}
    for cls, shapes in {"x": [(6, 4), (8, 10), (5, 7)], "y": [(9, 3)]}.items():
        for i, (h, w) in enumerate(shapes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = tmp_path / "train" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
            arrays[path] = arr
    gray = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "train" / "y" / "gray.png")
    arrays[tmp_path / "train" / "y" / "gray.png"] = np.repeat(gray[..., None], 3, axis=2)
    (tmp_path / "val" / "x").mkdir(parents=True)
    Image.fromarray(arrays[tmp_path / "train" / "x" / "0.png"]).save(tmp_path / "val" / "x" / "0.png")
    return tmp_path, arrays


def test_stats_mean_std_counts_and_sizes_match_numpy(pixel_data):
    data, arrays = pixel_data
    report = stats(data, workers=1, progress=False)
    pixels = np.concatenate([a.reshape(-1, 3) for a in arrays.values()]).astype(np.float64) / 255
    np.testing.assert_allclose(report["mean"], pixels.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(report["std"], pixels.std(axis=0), rtol=0, atol=1e-12)
    assert report["normalize"] == report["mean"] + report["std"] and report["pixels"] == len(pixels)
    train = report["splits"]["train"]
    assert train["counts"] == {"x": 3, "y": 2} and train["imbalance"] == 1.5
    assert report["splits"]["val"]["counts"] == {"x": 1}
    assert report["width"] == {"min": 3, "median": 5, "max": 10}
    assert report["height"] == {"min": 4, "median": 6, "max": 9}
    assert stats(data / "train", workers=2, progress=False)["mean"] == report["mean"]  # a folder of classes too
    sampled = stats(data, sample=2, workers=1, progress=False)
    assert sampled["images_measured"] == 2 and sampled["width"] == report["width"]


def test_stats_cli_writes_json_and_a_preset_the_recipe_reads(pixel_data, tmp_path):
    data, _ = pixel_data
    ran = cli("tools.stats", data, "--out", tmp_path / "s.json", "--workers", "1")
    assert ran.returncode == 0, ran.stderr
    assert "stats: 5/5 images (100%)" in ran.stderr  # each of the 5 images counted once (issue 23, 3.9: 10/10)
    report = json.loads((tmp_path / "s.json").read_text())
    assert "--normalize " in ran.stdout and len(report["normalize"]) == 6
    ran = cli("tools.stats", data, "--out", tmp_path / "p.toml", "--workers", "1")
    assert ran.returncode == 0, ran.stderr
    values = read_preset(str(tmp_path / "p.toml"))
    assert values == {"normalize": tuple(report["normalize"])}
    bad = cli("tools.stats", tmp_path / "missing")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1


# ---- normalisation in the recipe and the loaders ----

def test_normalize_validation_and_flag():
    assert Augmentation().normalize == MEAN + STD
    for bad in [(0.5,) * 5, (0.5, 0.5, 0.5, 0.2, 0.0, 0.2), (0.5, 0.5, 0.5, 0.2, -1.0, 0.2)]:
        with pytest.raises(UserError, match="normalize"):
            Augmentation(normalize=bad).validate()
    import argparse

    from rn50.config.cli import add_recipe_flags
    from rn50.config.recipe import resolve
    parser = argparse.ArgumentParser()
    add_recipe_flags(parser)
    recipe = resolve(parser.parse_args(["--normalize", "0.5,0.5,0.5,0.25,0.25,0.25"])).recipe
    assert recipe.augmentation.normalize == (0.5, 0.5, 0.5, 0.25, 0.25, 0.25)


@pytest.mark.parametrize("kind", ["dali-cpu", "torchvision"])
@pytest.mark.parametrize("split_name", ["train", "val"])
def test_loaders_apply_the_recipe_normalize(tmp_path, kind, split_name):
    for part in ("train", "val"):
        (tmp_path / part / "c0").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (64, 48), (200, 100, 30)).save(tmp_path / part / "c0" / f"{i}.png")
    norm = (0.5, 0.4, 0.3, 0.25, 0.2, 0.1)
    out = build_loader(kind, split_name, tmp_path, batch_size=8, image_size=32, dali_threads=1, workers=0,
                       augmentation=Augmentation(normalize=norm, color_jitter=0.0), preflight=False)
    images = torch.cat([x.float() for x, _ in out])
    expected = (torch.tensor([200, 100, 30]) / 255 - torch.tensor(norm[:3])) / torch.tensor(norm[3:])
    torch.testing.assert_close(images, expected.view(1, 3, 1, 1).expand_as(images), rtol=0, atol=1e-4)


def test_balanced_class_weights_give_every_class_the_same_total_weight():
    from rn50.core.step import class_weights

    weights = class_weights("balanced", (30, 10, 0, 20), "cpu")
    # N / (C x n_c) = 60 / (4 x n_c): 0.5, 1.5, 0 (no images), 0.75
    assert weights.tolist() == pytest.approx([0.5, 1.5, 0.0, 0.75])
    assert class_weights("none", (30, 10), "cpu") is None
    with pytest.raises(UserError, match="synthetic loader"):
        class_weights("balanced", None, "cpu")


def test_a_run_with_balanced_weights_uses_them_in_its_loss(data_dir, tmp_path):
    import torch

    from rn50.system.dist import DistEnv
    from rn50.config.recipe import with_fields
    from rn50.core.step import build_training

    parts = build_training(with_fields(arch="resnet18", class_weights="balanced", label_smoothing=0.0), 4,
                           DistEnv(0, 1, 0, torch.device("cpu")), class_counts=(12, 12, 6, 18))
    logits, labels = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 2, 2, 0, 3])
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor([1.0, 1.0, 2.0, 2 / 3]))
    assert parts.criterion(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(UserError, match="class_weights must be one of"):
        with_fields(class_weights="inverse").validate()
