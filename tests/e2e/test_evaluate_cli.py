"""rn50.evaluate's command: metrics from a confusion matrix, our checkpoints and torchvision state dicts,
size sweeps, user errors, and every validation image counted once on two ranks."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from rn50.core.validation import evaluate
from rn50.evaluate import class_metrics, main as evaluate_main, parse_sizes
from rn50.config.errors import UserError
from rn50.core.model import build_model
from tests.conftest import CLASSES, N_VAL_IMAGES, fixture_folders, run_cli, torchrun

FLAGS = ["--loader", "dali-cpu", "--image-size", "32", "--batch-size", "8", "--dali-threads", "1"]


def test_metrics_from_a_hand_made_confusion_matrix():
    # rows: true class, columns: predicted
    confusion = [[5, 1, 0, 0],
                 [2, 3, 1, 0],
                 [0, 0, 0, 0],   # c: no images, predicted once (a b image)
                 [0, 0, 0, 0]]   # d: no images and never predicted
    m = class_metrics(confusion, ["a", "b", "c", "d"])
    a, b, c, d = m["per_class"]
    assert (a["images"], a["predicted"], b["images"], b["predicted"], c["predicted"]) == (6, 7, 6, 4, 1)
    assert a["precision"] == pytest.approx(5 / 7) and a["recall"] == pytest.approx(5 / 6)
    assert a["accuracy"] == a["recall"]
    assert a["f1"] == pytest.approx(10 / 13)  # 2 * 5/7 * 5/6 / (5/7 + 5/6)
    assert b["precision"] == pytest.approx(3 / 4) and b["recall"] == pytest.approx(1 / 2)
    assert b["f1"] == pytest.approx(0.6)
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)  # zero division counts as 0
    assert (d["precision"], d["recall"], d["f1"]) == (0.0, 0.0, 0.0)
    # macro over the classes among the labels or the predictions (scikit-learn's label set): a, b, c
    assert m["macro"]["classes"] == 3
    assert m["macro"]["precision"] == pytest.approx((5 / 7 + 3 / 4) / 3)
    assert m["macro"]["recall"] == pytest.approx((5 / 6 + 1 / 2) / 3)
    assert m["macro"]["f1"] == pytest.approx((10 / 13 + 0.6) / 3)
    assert m["macro"]["accuracy"] == m["macro"]["recall"]


def test_a_perfect_matrix_scores_one():
    m = class_metrics([[3, 0], [0, 2]])
    assert m["macro"] == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "classes": 2}


def test_a_class_that_is_predicted_but_has_no_images_counts_in_the_macro():
    m = class_metrics([[1, 1], [0, 0]])
    assert m["macro"]["classes"] == 2
    assert m["per_class"][1]["precision"] == 0.0 and m["macro"]["precision"] == pytest.approx(0.5)


def test_bad_sizes_are_user_errors():
    assert parse_sizes("224, 256,288") == [224, 256, 288]
    for bad in ("224,x", "0", "", "224,224"):
        with pytest.raises(UserError):
            parse_sizes(bad)


@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory):
    """A resnet18 checkpoint as training saves it (model, EMA, recipe), with BlurPool off (90 MB, deleted after the
    module's tests unless one failed)."""
    path = fixture_folders(request, tmp_path_factory, "weights")[0] / "checkpoint_0001.pt"
    torch.manual_seed(0)
    model = build_model("resnet18", CLASSES)
    ema = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    ema["n_averaged"] = torch.tensor(3)
    torch.save({"model": model.state_dict(), "ema": ema,
                "recipe": {"model": {"arch": "resnet18"}, "augmentation": {"image_size": 32}}}, path)
    return path


def _evaluate(args) -> int:
    with pytest.raises(SystemExit) as exited:
        evaluate_main(args)
        raise SystemExit(0)
    return exited.value.code or 0


def test_a_checkpoint_is_evaluated_in_process(data_dir, checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    assert _evaluate(["--data", str(data_dir), "--weights", str(checkpoint), "--out", str(out), *FLAGS]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["val/count"] == N_VAL_IMAGES and report["arch"] == "resnet18"
    for key in ("top1", "top5", "loss", "per_class", "macro"):
        assert key in report
    assert len(report["per_class"]) == CLASSES
    assert {"accuracy", "precision", "recall", "f1"} <= set(report["per_class"][0])
    with (out / "confusion.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == report["classes"]
    counts = [[int(x) for x in row[1:]] for row in rows[1:]]
    assert sum(map(sum, counts)) == N_VAL_IMAGES
    assert [sum(row) for row in counts] == [c["images"] for c in report["per_class"]]
    assert sum(counts[i][i] for i in range(CLASSES)) == pytest.approx(report["top1"] * N_VAL_IMAGES / 100)
    assert (out / "confusion.png").stat().st_size > 0
    assert "top-1" in capsys.readouterr().out


def test_ema_weights_and_a_size_sweep(data_dir, checkpoint, tmp_path):
    out = tmp_path / "sweep"
    assert _evaluate(["--data", str(data_dir), "--weights", str(checkpoint), "--out", str(out), "--ema",
                      "--sizes", "32,40", *FLAGS]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["weights_kind"] == "checkpoint (EMA weights)"
    assert [r["image_size"] for r in report["sizes"]] == [32, 40]
    assert report["val/count"] == N_VAL_IMAGES and all(r["val/count"] == N_VAL_IMAGES for r in report["sizes"])
    assert (out / "confusion_32.csv").is_file() and (out / "confusion_40.csv").is_file()


def test_a_torchvision_state_dict_loads(data_dir, tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(build_model("resnet18", CLASSES).state_dict(), path)
    out = tmp_path / "eval"
    assert _evaluate(["--data", str(data_dir), "--weights", str(path), "--arch", "resnet18", "--out", str(out),
                      *FLAGS]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["weights_kind"] == "torchvision state dict" and report["val/count"] == N_VAL_IMAGES


@pytest.mark.parametrize("case", ["missing", "wrong-arch", "wrong-classes", "ema-of-state-dict", "bad-sizes"])
def test_user_errors_are_one_line_and_exit_2(data_dir, tmp_path, capsys, case):
    path = tmp_path / "w.pth"
    torch.save(build_model("resnet18", 10 if case == "wrong-classes" else CLASSES).state_dict(), path)
    extra = {"missing": ["--weights", str(tmp_path / "nope.pt")],
             "wrong-arch": ["--weights", str(path), "--arch", "resnet34"],
             "wrong-classes": ["--weights", str(path), "--arch", "resnet18"],
             "ema-of-state-dict": ["--weights", str(path), "--arch", "resnet18", "--ema"],
             "bad-sizes": ["--weights", str(path), "--arch", "resnet18", "--sizes", "32,big"]}[case]
    code = _evaluate(["--data", str(data_dir), "--out", str(tmp_path / "eval"), *extra, *FLAGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "eval" / "eval.json").exists()


@pytest.mark.slow
def test_two_ranks_count_every_image_once(data_dir, checkpoint, tmp_path):
    out = tmp_path / "eval2"
    # batch 8 on 2 ranks: 44 images are not a multiple of 16, so the shards are uneven
    result = run_cli(torchrun(2, "-m", "rn50.evaluate", "--data", str(data_dir), "--weights", str(checkpoint),
                              "--out", str(out), *FLAGS))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["world_size"] == 2 and report["val/count"] == N_VAL_IMAGES
    assert sum(c["images"] for c in report["per_class"]) == N_VAL_IMAGES
    assert result.stdout.count("top-1") == 1  # rank 0 alone prints


def test_evaluate_sums_and_confusion_match_a_direct_count():
    """The sums and the scatter-add confusion matrix against the same quantities computed directly (cross
    entropy summed in float64 in the same order, top-k by sort, the confusion by bincount): equal, over
    batches of unequal size."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6))
    generator = torch.Generator().manual_seed(3)
    loader = [(torch.randn(n, 3, 8, 8, generator=generator), torch.randint(0, 6, (n,), generator=generator))
              for n in (5, 5, 3)]
    confusion = torch.zeros(6, 6, dtype=torch.int64)
    result = evaluate(model, loader, confusion=confusion)

    loss, top1, top5, expected = torch.zeros((), dtype=torch.float64), 0, 0, torch.zeros(36, dtype=torch.int64)
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            loss += F.cross_entropy(logits, labels, reduction="sum").double()
            ranks = logits.argsort(dim=1, descending=True)
            top1 += int((ranks[:, 0] == labels).sum())
            top5 += int((ranks[:, :5] == labels[:, None]).any(dim=1).sum())
            expected += torch.bincount(labels * 6 + logits.argmax(dim=1), minlength=36)
    assert result["val/count"] == 13
    assert result["val/top1"] == 100.0 * top1 / 13 and result["val/top5"] == 100.0 * top5 / 13
    assert result["val/loss"] == float(loss) / 13
    assert torch.equal(confusion, expected.view(6, 6)) and int(confusion.sum()) == 13
