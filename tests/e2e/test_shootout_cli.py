"""benchmarks.shootout end to end on tiny images: every row in its own process, the JSON the acceptance check
reads, the table, the cached data set; and its flag errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_cli

from benchmarks.shootout import main
from benchmarks.shootout_rows import BOUND, ROWS

TINY = ["--images", "16", "--batch-size", "4", "--rounds", "1", "--image-side", "32", "32"]


def shootout(*args: str) -> subprocess.CompletedProcess:
    return run_cli([sys.executable, "-m", "benchmarks.shootout", *args], timeout=900)


@pytest.mark.slow
def test_every_row_runs_alone_and_the_json_has_each_rows_figures(tmp_path):
    cache = tmp_path / "cache"
    done = shootout("--out", str(tmp_path / "out"), "--cache", str(cache), *TINY)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "making the photo-like data set" in done.stdout
    report = json.loads((tmp_path / "out" / "shootout.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == list(ROWS)
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["min"] <= row["median_img_per_s"] <= row["max"] and row["rounds"] == 1
        assert row["cpu_ms_per_img"] >= 0 and row["settled"]
        if name != BOUND:  # the same delivered task for every loader row, ours and the reference
            assert row["delivered"] == "float16 [4, 3, 224, 224] channels_last", row
            assert row["cpu_ms_per_img"] > 0
    assert rows[BOUND]["decoder"] in ("torchvision.io.decode_jpeg", "PIL")
    assert report["data"]["images"] == 16 and report["data"]["short_side"] == [32, 32]
    assert report["settings"]["rounds"] == 1 and report["environment"]["torch"]
    table = (tmp_path / "out" / "shootout.md").read_text()
    assert table in done.stdout and all(f"| `{name}` |" in table for name in ROWS)
    # the made data set is kept: a second run measures at once
    again = shootout("--out", str(tmp_path / "again"), "--cache", str(cache), *TINY, "--loaders", BOUND)
    assert again.returncode == 0 and "making" not in again.stdout, again.stderr[-2000:]


@pytest.mark.parametrize("flags, says", [
    (["--loaders", "dali-cpu,ffcv"], "--loaders: unknown row(s) ffcv"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--images", "8", "--batch-size", "64"], "less than one batch"),
])
def test_a_bad_flag_is_one_line_and_nothing_is_written(tmp_path, capsys, flags, says):
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not (tmp_path / "out").exists()


def fake_round(failing: str):
    """A row's result as benchmarks.shootout_rows prints it, or `failing`'s failure: the exit rule under test
    reads nothing else (the rows themselves run in the slow test above)."""
    def run_row(row, args, data, number, decoder):
        if row == failing:
            return {"failed": "exit 1: RuntimeError: it broke"}
        cpu = 1.0 + (len(ROWS) - ROWS.index(row)) + 0.1 * number  # the last row the cheapest
        return {"row": row, "images": 64, "wall_s": 1.0, "cpu_s": cpu * 0.064, "settled": True, "decode": "x",
                "delivered": "float16 [64, 3, 224, 224] channels_last", "img_per_s": 64.0 + number,
                "cpu_ms_per_img": cpu, **({"decoder": "PIL"} if row == BOUND else {})}
    return run_row


@pytest.mark.parametrize("failing, code", [("torchvision-gpu", 0), ("dali-cpu", 1)])
def test_a_failed_row_is_recorded_the_others_run_and_only_a_required_one_fails_the_run(
        tmp_path, monkeypatch, capsys, data_dir, failing, code):
    monkeypatch.setattr("benchmarks.shootout.run_row", fake_round(failing))
    out = tmp_path / "out"
    if code:
        with pytest.raises(SystemExit) as exit_:
            main(["--out", str(out), "--data", str(data_dir), "--rounds", "3", "--images", "64"])
        assert exit_.value.code == code
    else:
        main(["--out", str(out), "--data", str(data_dir), "--rounds", "3", "--images", "64"])
    said = capsys.readouterr().out
    assert said.count(f"{failing:26s} FAILED: exit 1: RuntimeError: it broke") == 1  # not retried every round
    rows = {row["name"]: row for row in json.loads((out / "shootout.json").read_text())["rows"]}
    assert rows[failing]["status"] == "failed" and rows[failing]["reason"] == "exit 1: RuntimeError: it broke"
    bound = rows[BOUND]
    for name, row in rows.items():
        if name != failing:  # three rounds each: medians, extremes, the ratio to the decode's CPU time
            assert row["rounds"] == 3 and row["median_img_per_s"] == 65.0 and (row["min"], row["max"]) == (64, 66)
            assert row["cpu_ms_per_img"] == pytest.approx(1.1 + len(ROWS) - ROWS.index(name))
            assert row["cpu_vs_decode"] == pytest.approx(row["cpu_ms_per_img"] / bound["cpu_ms_per_img"])
    table = (out / "shootout.md").read_text().splitlines()
    ranked = [line.split("`")[1] for line in table if line.startswith("| `") and "failed" not in line]
    assert ranked == [name for name in ROWS[::-1] if name != failing]  # by CPU time per image, the cheapest first
