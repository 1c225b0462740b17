"""benchmarks.run as users launch it: under torchrun on two ranks, a report per rank, the aggregate and the scaling
efficiency (moved from tests/component/test_benchmarks.py: it starts torchrun)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, torchrun


@pytest.mark.slow
def test_two_ranks_report_per_rank_aggregate_and_scaling(data_dir, tmp_path):
    out = tmp_path / "bench"
    done = run_cli(torchrun(2, "-m", "benchmarks.run", "--data", str(data_dir), "--out", str(out),
                            "--modes", "synthetic,train", "--loaders", "dali-cpu", "--arch", "resnet18",
                            "--image-size", "32", "--batch-size", "4", "--warmup-steps", "1", "--steps", "3",
                            "--repeats", "2", "--dali-threads", "1"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["world_size"] == 2 and report["environment"]["launcher"] == "torchrun"
    for row in report["results"]:
        assert [r["rank"] for r in row["per_rank"]] == [0, 1]
        assert row["img_per_s"] == pytest.approx(sum(r["img_per_s"] for r in row["per_rank"]), rel=0.01)
        assert row["img_per_s_per_gpu"] == pytest.approx(row["img_per_s"] / 2)
    scaling = report["scaling"]
    synthetic = next(r for r in report["results"] if r["mode"] == "synthetic")
    assert scaling["aggregate_img_per_s"] == synthetic["img_per_s"] and scaling["single_gpu_img_per_s"] > 0
    assert scaling["efficiency"] == pytest.approx(scaling["aggregate_img_per_s"] / (2 * scaling["single_gpu_img_per_s"]))
