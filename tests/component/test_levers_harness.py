"""The harness's --levers table measured for real (moved from tests/unit: these run the harness and a DALI CPU
pipeline): a tiny run's table on the CPU, and each lever row measured with its own settings."""

from __future__ import annotations

import json

import pytest

from benchmarks.measure import Bench
from benchmarks.run import main


def test_harness_levers_table_from_a_real_run(data_dir, tmp_path):
    out = tmp_path / "bench"
    main(["--data", str(data_dir), "--out", str(out), "--modes", "synthetic,train", "--loaders", "dali-cpu",
          "--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--dali-threads", "1",
          "--warmup-steps", "1", "--steps", "2", "--repeats", "1", "--levers", "channels-last,cuda-graphs,batch8"])
    report = json.loads((out / "report.json").read_text())
    levers = report["levers"]
    rows = {r["lever"]: r for r in levers["rows"]}
    assert list(rows)[:4] == ["baseline", "channels-last", "cuda-graphs", "batch8"]
    assert rows["cuda-graphs"]["measured"] is False and rows["cuda-graphs"]["reason"] == "needs a CUDA GPU"
    assert rows["channels-last"]["state"] == "off" and rows["batch8"]["batch_size"] == 8
    baseline_e2e = next(r for r in report["results"] if (r["mode"], r["loader"]) == ("train", "dali-cpu"))
    assert rows["baseline"]["end_to_end"]["img_per_s"] == baseline_e2e["img_per_s"]  # reused, not remeasured
    assert rows["baseline"]["ratio_to_baseline"] == 1.0 and levers["ranked_by"] == "end_to_end"
    for name in ("channels-last", "batch8"):
        r = rows[name]
        assert r["ratio_to_baseline"] == pytest.approx(r["end_to_end"]["img_per_s"] / baseline_e2e["img_per_s"])
        assert r["end_to_end"]["of_synthetic"] == pytest.approx(r["end_to_end"]["img_per_s"]
                                                                 / r["synthetic"]["img_per_s"])
    if levers["best_fields"]:
        assert levers["preset"] == str(out / "levers.toml") and (out / "levers.toml").is_file()
        assert rows["best combination"]["fields"] == levers["best_fields"]
    assert "## Speed levers" in (out / "report.md").read_text()


def test_a_lever_measures_its_own_settings(data_dir, monkeypatch, tmp_path):
    """Each row is measured with its own recipe and machine settings, not the baseline's."""
    seen = []
    original = Bench.measure

    def spy(self, mode, loader_name, repeats=None):
        seen.append((loader_name, self.recipe.optimisation.batch_size, self.recipe.precision.channels_last))
        return original(self, mode, loader_name, repeats)

    monkeypatch.setattr(Bench, "measure", spy)
    main(["--data", str(data_dir), "--out", str(tmp_path / "b"), "--modes", "synthetic", "--loaders", "",
          "--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--warmup-steps", "1", "--steps", "2",
          "--repeats", "1", "--levers", "channels-last,batch8"])
    assert seen[:3] == [("synthetic", 4, True), ("synthetic", 4, False), ("synthetic", 8, True)]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["config"]["loaders"] == [] and report["verdicts"] == {}  # `--loaders ""`: none, not the default
