"""`--pretrained` / `--weights NAME` as users run them (issue 40, 5): without a network and without the file, one
line on stdout and stderr together, exit 2, no traceback and no run folder; once per node under torchrun."""

from __future__ import annotations

import sys

import pytest

from conftest import run_cli, run_clis, torchrun

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--dali-threads", "1"]
# no network wherever the test runs: a proxy on the discard port, closed, refuses the connection at once
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


def lines(done) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def test_pretrained_without_network_or_file_is_one_line_and_no_run_folder(data_dir, tmp_path):
    """The acceptance check's command (resnet50, an empty TORCH_HOME), and an unknown name."""
    hub, out = tmp_path / "empty-hub", tmp_path / "runs" / "pre"
    missing, unknown = run_clis([
        [sys.executable, "-m", "rn50.train", "--data", str(data_dir), "--out", str(out), *TINY, "--arch", "resnet50",
         "--pretrained"],
        [sys.executable, "-m", "rn50.train", "--data", str(data_dir), "--out", str(out), *TINY, "--weights", "NOPE"],
    ], TORCH_HOME=str(hub), OMP_NUM_THREADS="2", **OFFLINE)
    for done in (missing, unknown):
        assert done.returncode == 2 and len(lines(done)) == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and lines(done)[0].startswith("error: ")
    path = hub / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert f"put it at {path} " in lines(missing)[0]
    assert "fetch https://download.pytorch.org/models/resnet50-11ad3fa6.pth " in lines(missing)[0]
    assert "--weights NOPE is not a name of resnet18's weights in torchvision (ResNet18_Weights): one of " \
           "IMAGENET1K_V1, DEFAULT " in lines(unknown)[0]
    assert not (tmp_path / "runs").exists() and not hub.exists()  # nothing written, not even the folders


@pytest.mark.slow
def test_under_torchrun_the_missing_weights_are_said_once_per_node(data_dir, tmp_path):
    """Two processes on one node meet the same empty cache: one `error:` line, not one per process (torchrun
    adds its own report of the failed workers)."""
    done = run_cli(torchrun(2, "-m", "rn50.train", "--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY,
                            "--pretrained"), TORCH_HOME=str(tmp_path / "empty-hub"), **OFFLINE)
    errors = [line for line in lines(done) if line.startswith("error: ")]
    assert done.returncode != 0 and len(errors) == 1, done.stdout + done.stderr
    assert "resnet18-f37072fd.pth" in errors[0] and not (tmp_path / "run").exists()
