"""benchmarks.compare on real harness reports and a real training run made here: one table whose figures are
the inputs' own, the settings that differ named and flagged, and one-line errors for what it cannot read."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import compare
from benchmarks.run import main as bench_main
from rn50.train import main as train_main

from conftest import fixture_folders

HARNESS = ["--arch", "resnet18", "--image-size", "32", "--modes", "synthetic", "--loaders", "", "--warmup-steps", "1",
           "--steps", "2", "--repeats", "1"]


@pytest.fixture(scope="module")
def runs(request, data_dir, tmp_path_factory):
    """Two harness reports that differ only in batch size, and a training run that reaches its target (deleted
    after the module's tests, unless one failed)."""
    torch.set_num_threads(1)
    (root,) = fixture_folders(request, tmp_path_factory, "compare")
    for batch in (4, 8):
        bench_main(["--data", str(data_dir), "--out", str(root / f"bench{batch}"), "--batch-size", str(batch), *HARNESS])
    # synthetic validation sits near chance (25% with 4 classes): a 1% target is reached in the first epoch
    train_main(["--data", str(data_dir), "--out", str(root / "train"), "--loader", "synthetic", "--arch", "resnet18",
                "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1",
                "--lr-milestones", "2", "--log-every", "3", "--target-top1", "1"])
    return root


def test_two_reports_in_one_table_naming_the_batch_difference(runs, tmp_path):
    out = tmp_path / "cmp"
    compare.main([str(runs / "bench4"), str(runs / "bench8" / "report.json"), "--out", str(out)])
    text = (out / "compare.md").read_text()
    result = json.loads((out / "compare.json").read_text())
    assert result["mismatched"] == {"batch_size": [4, 8]}
    assert "**Not like for like.**" in text and "- **batch_size** differs: bench4 4, bench8 8" in text
    assert "| **batch_size** ⚠ | 4 | 8 |" in text  # the differences table calls it out too
    rows = {r["run"]: r for r in result["rows"]}
    for batch in (4, 8):
        report = json.loads((runs / f"bench{batch}" / "report.json").read_text())
        synthetic = next(r for r in report["results"] if r["mode"] == "synthetic")
        row = rows[f"bench{batch}"]
        assert row["img_per_s"] == synthetic["img_per_s"] and row["pct_of_ceiling"] == 1.0
        assert row["hours_90_epochs"] == report["time_to_train_90_epochs"]["synthetic"]["total_hours"]
        assert f"| bench{batch} | synthetic | CPU | 1 | {synthetic['img_per_s']:,.1f} |" in text
        assert f"batch_size={batch} |" in text  # each row names its own value
        commit = report["environment"]["git_commit"][:10]
        assert commit in text  # each input's commit, in the environment table
    assert (out / "compare.png").stat().st_size > 0


def test_same_settings_are_not_flagged(runs, tmp_path):
    result = compare.compare([str(runs / "bench4"), str(runs / "bench4" / "report.json")])
    assert result["mismatched"] == {} and result["differences"] == {}
    first, second = [i["run"] for i in result["inputs"]]  # one folder twice: told apart, not merged
    assert first.endswith("/bench4") and second == f"{first} (2)"
    assert "Not like for like" not in compare.markdown(result)


def test_a_training_run_beside_a_report(runs):
    result = compare.compare([str(runs / "bench8"), str(runs / "train")])
    summary = json.loads((runs / "train" / "summary.json").read_text())
    row = next(r for r in result["rows"] if r["kind"] == "train")
    assert row["img_per_s"] == summary["train/img_per_s"] and row["measured"] == "training synthetic"
    assert row["target"] == summary["target"] and summary["target"]["time_s"] > 0
    assert result["differences"]["measured_by"] == ["benchmarks.run", "rn50.train"]
    assert "batch_size" not in result["mismatched"]  # both ran batch 8
    text = compare.markdown(result)
    assert "to 1%" in text and "measured differently" in text


def test_the_loader_is_compared_row_by_row(runs, tmp_path):
    """Issue 37.6: a report measures several loaders, a training run one; compare flagged `loader` on every
    report row (and called the pair not like for like), even the row with the training run's own loader."""
    import shutil

    # what compare reads of a run (its JSON files), not its checkpoints: ~0.1 GB the suite's peak need not hold
    train = shutil.copytree(runs / "train", tmp_path / "train", ignore=shutil.ignore_patterns("checkpoint*", "*.pt"))
    summary = json.loads((train / "summary.json").read_text())
    (train / "summary.json").write_text(json.dumps({**summary, "machine": {**summary["machine"], "loader": "dali-cpu"}}))
    report = json.loads((runs / "bench8" / "report.json").read_text())
    synthetic = report["results"][0]
    report["results"] += [{**synthetic, "mode": "train", "loader": name} for name in ("dali-cpu", "torchvision")]
    report["config"]["loaders"] = ["dali-cpu", "torchvision"]
    (tmp_path / "bench.json").write_text(json.dumps(report))
    result = compare.compare([str(tmp_path / "bench.json"), str(train)])
    assert "loader" not in result["mismatched"] and "Not like for like" not in compare.markdown(result)
    unmatched = {row["measured"]: row["loader_unmatched"] for row in result["rows"]}
    assert unmatched == {"synthetic": False, "train dali-cpu": False, "train torchvision": True,
                         "training dali-cpu": False}
    assert "| loader=torchvision |" in compare.markdown(result)


def test_time_to_another_target_from_the_epoch_lines(runs):
    records = [json.loads(l) for l in (runs / "train" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "val/top1" in r)
    reach = compare.compare([str(runs / "train")], target=first["val/top1"])["rows"][0]["target"]
    assert reach == {"top1": first["val/top1"], "time_s": first["time_s"], "epochs": first["epoch"]}
    never = compare.compare([str(runs / "train")], target=101.0)["rows"][0]["target"]
    assert never["time_s"] is None and "not reached" in compare._target_text(never)


@pytest.mark.parametrize("make, expected", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds neither report.json nor summary.json"),
    (lambda p: (p / "x.json").write_text("{not json") and p / "x.json", "is not valid JSON"),
    (lambda p: (p / "y.json").write_text('{"schema": "other"}') and p / "y.json", "is neither a harness report"),
])
def test_unreadable_inputs_are_one_line_errors(make, expected, tmp_path, capsys):
    bad = make(tmp_path)
    with pytest.raises(SystemExit) as stop:
        compare.main([str(bad), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    assert "pass a benchmarks.run --out folder" in err[0]  # the fix, on the same line
