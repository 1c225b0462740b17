"""rn50.evaluate's start-up checks on a real DALI CPU pipeline (moved from tests/unit/test_resume_and_data_checks.py,
issue 23: 3.6, 3.7, 3.12): a contradicting --arch, and only the validation split's files checked and named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipelines.folder import check_files, list_split
from rn50.core.model import build_model

from conftest import CLASSES


def test_evaluate_refuses_a_contradicting_arch_and_reads_only_val(data_dir, tmp_path, capsys):
    """3.7: `--arch resnet50` on resnet18 weights said "set --arch for a torchvision state dict"; 3.6: bad files in
    train/ were counted (and named) in evaluate's refusal although it reads val/ alone; 3.12: the EMA PNG's title."""
    from rn50.evaluate import confusion_title, main

    weights = tmp_path / "checkpoint_0001.pt"
    torch.save({"model": build_model("resnet18", CLASSES).state_dict(),
                "recipe": {"model": {"arch": "resnet18"}, "augmentation": {"image_size": 32}}}, weights)
    flags = ["--loader", "dali-cpu", "--image-size", "32", "--batch-size", "8", "--dali-threads", "1"]

    def evaluate(*extra, data=data_dir):
        with pytest.raises(SystemExit) as exited:
            main(["--data", str(data), "--weights", str(weights), "--out", str(tmp_path / "eval"), *flags, *extra])
            raise SystemExit(0)
        return exited.value.code or 0, capsys.readouterr().err.strip().splitlines()

    code, err = evaluate("--arch", "resnet50")
    assert code == 2 and len(err) == 1 and "holds resnet18 weights" in err[0] and "drop --arch" in err[0]

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "train" / "n00000000" / "empty.JPEG").write_bytes(b"")
    (data / "val" / "n00000002" / "page.JPEG").write_text("<html>404</html>\n")
    code, err = evaluate(data=data)
    assert code == 2 and len(err) == 1 and "page.JPEG" in err[0]
    assert "train" not in err[0].replace(str(data), "DATA") and "--manifest SCAN" in err[0]
    (data / "val" / "n00000002" / "page.JPEG").unlink()
    list_split.cache_clear()
    check_files.cache_clear()
    code, _ = evaluate(data=data)  # train/ still holds the bad file: evaluation does not read it
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert code == 0 and report["arch"] == "resnet18" and report["resize_to"] == 36

    assert "EMA" in confusion_title("c.pt", "checkpoint (EMA weights)", 32, 50.0)
    assert "EMA" not in confusion_title("c.pt", "checkpoint", 32, 50.0)
