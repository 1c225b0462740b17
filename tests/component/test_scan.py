"""tools.scan and pipelines.jpeg_check: every kind of bad file is named with its reason, the manifests
list exactly the good files with training-order labels, --fix re-encodes what can be saved, and the
dataset folder is never written to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import UserError
from pipelines.jpeg_check import find_header_problems, header_problem
from tools.make_dataset import make_dataset
from tools.scan import scan

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["n00000000", "n00000001", "n00000002"]
BAD_CLASS = "n00000001"  # label 1
# name -> reason the scan must give; the files are written by `inject` below
BAD = {
    "zero_bytes.JPEG": "zero bytes",
    "truncated.JPEG": "truncated (no end-of-image marker)",
    "png_inside.JPEG": "PNG data behind a JPEG name",
    "cmyk.JPEG": "CMYK JPEG (4 colour components)",
    "text.JPEG": "not an image (text)",
    "tiny.JPEG": "too small to crop",
    "notes.txt": "not an image name",  # was "not a JPEG name", though x.png is good (issue 38, 8)
}
FIXABLE = {"png_inside.JPEG", "cmyk.JPEG"}
GOOD_EXTRA = ["progressive.jpg", "gray.JPEG"]  # unusual but fine: must be listed


def photo(size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def inject(class_dir: Path) -> None:
    real = sorted(class_dir.glob("*.JPEG"))[0].read_bytes()
    (class_dir / "zero_bytes.JPEG").write_bytes(b"")
    (class_dir / "truncated.JPEG").write_bytes(real[: len(real) // 2])
    Image.new("RGB", (64, 64), (9, 99, 199)).save(class_dir / "png_inside.JPEG", format="PNG")
    Image.new("CMYK", (64, 64), (9, 99, 199, 0)).save(class_dir / "cmyk.JPEG", format="JPEG")
    (class_dir / "text.JPEG").write_text("<html><body>404 Not Found</body></html>\n")
    photo((4, 4)).save(class_dir / "tiny.JPEG", format="JPEG")
    (class_dir / "notes.txt").write_text("not an image\n")
    photo().save(class_dir / "progressive.jpg", format="JPEG", progressive=True)
    photo().convert("L").save(class_dir / "gray.JPEG", format="JPEG")


def listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scan") / "data"
    make_dataset(out, 3, 6, 3, seed=1, min_side=48, max_side=64, workers=2)
    inject(out / "train" / BAD_CLASS)
    return out


def expected_lines(dataset: Path, split: str, skip=()) -> list[str]:
    lines = []
    for label, cls in enumerate(CLASSES):
        for f in sorted((dataset / split / cls).iterdir()):
            if f.name not in skip and f.suffix.lower() in (".jpeg", ".jpg"):
                lines.append(f"{cls}/{f.name} {label}")
    return lines


def test_scan_names_every_bad_file_and_lists_exactly_the_good_ones(dataset, tmp_path):
    before = listing(dataset)
    report = scan(dataset, tmp_path / "out", workers=2, progress=False)
    assert listing(dataset) == before  # nothing written into the dataset, nothing touched

    train = report["splits"]["train"]
    found = {e["path"]: e["reason"] for e in train["bad"]}
    assert found == {f"{BAD_CLASS}/{name}": reason for name, reason in BAD.items()}
    assert not any("fixed" in e for e in train["bad"]) and train["fixed"] == 0
    assert train["files"] == 3 * 6 + len(BAD) + len(GOOD_EXTRA)
    assert train["good"] == 3 * 6 + len(GOOD_EXTRA) and train["classes"] == 3
    assert train["reasons"]["zero bytes"] == 1 and train["empty_classes"] == []

    lines = (tmp_path / "out" / "train.txt").read_text().splitlines()
    assert lines == expected_lines(dataset, "train", skip=BAD)
    assert f"{BAD_CLASS}/progressive.jpg 1" in lines and f"{BAD_CLASS}/gray.JPEG 1" in lines

    val = (tmp_path / "out" / "val.txt").read_text().splitlines()
    assert val == expected_lines(dataset, "val") and len(val) == 9
    assert report["splits"]["val"]["bad"] == []

    on_disk = json.loads((tmp_path / "out" / "scan_report.json").read_text())
    assert on_disk["splits"]["train"]["bad"] == train["bad"]
    assert on_disk["dataset"] == str(dataset.resolve()) and on_disk["min_side"] == 8


def test_fix_reencodes_png_and_cmyk_as_rgb_jpegs_outside_the_dataset(dataset, tmp_path):
    before = listing(dataset)
    out = tmp_path / "out"
    report = scan(dataset, out, workers=1, fix=True, progress=False)  # workers=1: the in-process path
    assert listing(dataset) == before  # originals untouched, nothing added

    train = report["splits"]["train"]
    fixed = {e["path"]: e["fixed"] for e in train["bad"] if "fixed" in e}
    assert set(fixed) == {f"{BAD_CLASS}/{name}" for name in FIXABLE} and train["fixed"] == 2
    assert train["good"] == 3 * 6 + len(GOOD_EXTRA) + 2
    for rel, path in fixed.items():
        assert Path(path) == (out / "fixed" / "train" / rel).resolve()
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))
        assert header_problem(path) is None

    lines = (out / "train.txt").read_text().splitlines()
    absolute = sorted(line for line in lines if line.startswith("/"))
    assert absolute == sorted(f"{fixed[f'{BAD_CLASS}/{name}']} 1" for name in FIXABLE)
    relative = [line for line in lines if not line.startswith("/")]
    assert relative == expected_lines(dataset, "train", skip=BAD)

    with Image.open(fixed[f"{BAD_CLASS}/cmyk.JPEG"]) as im:  # colours survive CMYK -> RGB
        expected = Image.new("CMYK", (1, 1), (9, 99, 199, 0)).convert("RGB").getpixel((0, 0))
        assert np.abs(np.asarray(im, np.int16) - np.array(expected)).max() <= 8


def test_summary_counts_add_up_with_fix(tmp_path):
    """Issue 14 item 8: with --fix the split line once read "13 files, 13 good (1 fixed), 1 bad". Every file
    is now counted once: good as found + fixed + bad (left out) = files."""
    import re

    from tools.scan import summary

    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split / "n0").mkdir(parents=True)
        for i in range(3):
            photo().save(data / split / "n0" / f"{i}.JPEG", format="JPEG")
    Image.new("RGB", (64, 64), (9, 99, 199)).save(data / "train" / "n0" / "png_inside.JPEG", format="PNG")
    (data / "train" / "n0" / "zero_bytes.JPEG").write_bytes(b"")  # cannot be fixed

    report = scan(data, tmp_path / "out", workers=1, fix=True, progress=False)
    text = summary(report)
    counts = dict(re.findall(r"^(\w+): (\d+ files, .*), \d+ classes$", text, re.M))
    assert counts == {"train": "5 files, 3 good, 1 fixed, 1 bad", "val": "3 files, 3 good, 0 bad"}, text
    for split, line in counts.items():
        total, *parts = (int(n) for n in re.findall(r"\d+", line))
        assert total == sum(parts) == report["splits"][split]["files"]
    assert "     1  PNG data behind a JPEG name (fixed)" in text and "     1  zero bytes\n" in text
    assert "1 bad file is left out of the manifests" in text
    assert len((tmp_path / "out" / "train.txt").read_text().splitlines()) == report["splits"]["train"]["good"] == 4


def test_correctly_named_other_formats_are_good_and_never_fixed(tmp_path):
    """Issue 23 item 3.1: PIL names WebP "WEBP", the header check "WebP"; the scan compared them with case,
    so every good .webp was reported as "WEBP data behind a JPEG name" and --fix rewrote it as JPEG bytes.
    A PNG/BMP/TIFF/WebP under its own suffix is good, as in the pre-flight check, and --fix leaves it alone."""
    data = tmp_path / "data"
    names = ["x.webp", "x.WEBP", "x.png", "x.bmp", "x.tif"]
    for split in ("train", "val"):
        (data / split / "n0").mkdir(parents=True)
        photo().save(data / split / "n0" / "a.JPEG", format="JPEG")
        for name in names:
            photo().save(data / split / "n0" / name)
    report = scan(data, tmp_path / "out", workers=1, fix=True, progress=False)
    for split in ("train", "val"):
        assert report["splits"][split]["bad"] == [] and report["splits"][split]["fixed"] == 0
        lines = (tmp_path / "out" / f"{split}.txt").read_text().splitlines()
        assert sorted(lines) == sorted(f"n0/{name} 0" for name in ["a.JPEG", *names])
    assert not (tmp_path / "out" / "fixed").exists()
    assert find_header_problems(sorted((data / "train" / "n0").iterdir())) == []  # the pre-flight agrees


def test_the_name_rule_in_the_docs_is_the_scanners(tmp_path):
    """Issue 38, 8: docs/reliability.md said a file whose name does not end in .jpeg/.jpg is bad, while the scan
    lists x.png as good and called notes.txt "not a JPEG name". The scanner's rule is the loaders' (their
    IMAGE_SUFFIXES): the doc now states it, and notes.txt is "not an image name"."""
    from pipelines.folder import IMAGE_SUFFIXES

    (tmp_path / "data" / "train" / "n0").mkdir(parents=True)
    photo().save(tmp_path / "data" / "train" / "n0" / "x.png")
    photo().save(tmp_path / "data" / "train" / "n0" / "y.JPEG", format="JPEG")
    (tmp_path / "data" / "train" / "n0" / "notes.txt").write_text("not an image\n")
    train = scan(tmp_path / "data", tmp_path / "out", workers=1, progress=False)["splits"]["train"]
    assert train["bad"] == [{"path": "n0/notes.txt", "reason": "not an image name"}] and train["good"] == 2
    doc = (ROOT / "docs" / "reliability.md").read_text()
    start = doc.index("- its name doesn't end in")
    rule = doc[start:doc.index("\n\n", start)]  # the bullet, the last of its list
    assert all(f"`{suffix}`" in rule for suffix in IMAGE_SUFFIXES), rule
    assert '"not an image name"' in rule and "`x.png`" in rule and "good" in rule, rule


def test_min_side_is_configurable(dataset, tmp_path):
    report = scan(dataset, tmp_path / "out", min_side=50, workers=2, progress=False)
    small = {e["path"] for e in report["splits"]["train"]["bad"] if e["reason"] == "too small to crop"}
    decodable = [f for c in CLASSES for f in (dataset / "train" / c).iterdir()
                 if f.name.startswith("n0") or f.name in GOOD_EXTRA or f.name in FIXABLE]
    sizes = {f"{f.parent.name}/{f.name}": min(Image.open(f).size) for f in decodable}
    assert small == {p for p, s in sizes.items() if s < 50} | {f"{BAD_CLASS}/tiny.JPEG"}


def test_user_mistakes_are_user_errors(dataset, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(UserError, match="inside the dataset"):
        scan(dataset, dataset / "scan-out")
    assert not (dataset / "scan-out").exists()
    (tmp_path / "no-train" / "val" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="train"):
        scan(tmp_path / "no-train", tmp_path / "out")
    odd = tmp_path / "odd"
    for split, cls in (("train", "a"), ("val", "b")):
        (odd / split / cls).mkdir(parents=True)
        photo().save(odd / split / cls / "x.JPEG")
    with pytest.raises(UserError, match="training classes"):
        scan(odd, tmp_path / "out")


def test_cli_exit_codes(dataset, tmp_path):
    missing = subprocess.run([sys.executable, "-m", "tools.scan", str(tmp_path / "missing"), "--out",
                              str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("error: ") and len(missing.stderr.strip().splitlines()) == 1

    ran = subprocess.run([sys.executable, "-m", "tools.scan", str(dataset), "--out", str(tmp_path / "out"),
                          "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr  # bad files found is still a successful scan
    assert "train: 27 files, 20 good, 7 bad, 3 classes" in ran.stdout
    assert "1  CMYK JPEG (4 colour components)" in ran.stdout and "--fix" in ran.stdout
    assert "scan: 35/35 files" in ran.stderr  # the progress line


# ---- header_problem: the fast pre-flight check ----

def write(tmp_path: Path, name: str, make) -> Path:
    path = tmp_path / name
    make(path)
    return path


def jpeg_bytes(**kw) -> bytes:
    import io

    buf = io.BytesIO()
    photo((80, 60)).save(buf, format="JPEG", **kw)
    return buf.getvalue()


HEADER_CASES = {
    "normal": (lambda p: p.write_bytes(jpeg_bytes()), None),
    "progressive": (lambda p: p.write_bytes(jpeg_bytes(progressive=True)), None),
    "grayscale": (lambda p: photo().convert("L").save(p, format="JPEG"), None),
    "exif": (lambda p: p.write_bytes(jpeg_bytes(exif=Image.Exif().tobytes(), comment=b"x" * 9000)), None),
    "zero padding": (lambda p: p.write_bytes(jpeg_bytes() + b"\0" * 100), None),
    "short trailer": (lambda p: p.write_bytes(jpeg_bytes() + b"trailer" * 100), None),
    "zero bytes": (lambda p: p.write_bytes(b""), "zero bytes"),
    "truncated": (lambda p: p.write_bytes(jpeg_bytes()[:-500]), "truncated (no end-of-image marker)"),
    "no eoi": (lambda p: p.write_bytes(jpeg_bytes()[:-2]), "truncated (no end-of-image marker)"),
    "header only": (lambda p: p.write_bytes(jpeg_bytes()[:300]), "truncated (no end-of-image marker)"),
    "png": (lambda p: photo().save(p, format="PNG"), "PNG data behind a JPEG name"),
    "gif": (lambda p: photo().save(p, format="GIF"), "GIF data behind a JPEG name"),
    "cmyk": (lambda p: photo().convert("CMYK").save(p, format="JPEG"), "CMYK JPEG (4 colour components)"),
    "text": (lambda p: p.write_text("not an image\n"), "not an image (text)"),
    "binary": (lambda p: p.write_bytes(bytes(range(256)) * 4), "not an image (unknown format)"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_problem(tmp_path, case):
    make, reason = HEADER_CASES[case]
    assert header_problem(write(tmp_path, f"{case}.JPEG", make)) == reason


def test_header_problem_of_a_missing_file_is_a_reason(tmp_path):
    assert header_problem(tmp_path / "gone.JPEG").startswith("unreadable (")


def test_find_header_problems_keeps_order_and_skips_good_files(tmp_path):
    paths = [write(tmp_path, f"{case}.JPEG", make) for case, (make, _) in sorted(HEADER_CASES.items())]
    expected = [(str(p), HEADER_CASES[case][1]) for p, case in zip(paths, sorted(HEADER_CASES))
                if HEADER_CASES[case][1] is not None]
    assert find_header_problems(paths * 3, workers=4) == expected * 3
    assert find_header_problems(paths, workers=1) == expected
    assert find_header_problems([]) == []
