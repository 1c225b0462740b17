"""Fine-tuning from torchvision's weights by name (issue 40, 5): `--pretrained` finds the file in the torch hub
cache (TORCH_HOME), loads it as --finetune-from does (a new classifier for the data's classes, the backbone
frozen first), records which weights in recipe.json and every checkpoint, and a resume needs no file."""

from __future__ import annotations

import hashlib
import json

import torch
import torchvision

from rn50.train import main

from conftest import CLASSES

SMALL = ["--loader", "dali-cpu", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--dali-threads", "1",
         "--warmup-epochs", "0", "--log-every", "6", "--keep-checkpoints", "1"]


def test_pretrained_weights_from_the_hub_cache_start_the_run(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # no download, wherever the test runs
    # the file torchvision would have downloaded for ResNet18_Weights.IMAGENET1K_V1 (DEFAULT), under its name:
    # random weights of another seed than the run's, 1000 classes
    torch.manual_seed(5)
    published = torchvision.models.resnet18().state_dict()
    cache = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cache.parent.mkdir(parents=True)
    torch.save(published, cache)
    run = tmp_path / "run"
    flags = ["--data", str(data_dir), "--out", str(run), *SMALL, "--pretrained", "--freeze-backbone-epochs", "1"]
    main([*flags, "--epochs", "1"])
    said = capsys.readouterr().out
    assert f"fine-tuning from ResNet18_Weights.IMAGENET1K_V1 ({cache}); new classifier for {CLASSES} classes" in said
    assert f"note: {cache} is not the file torchvision publishes as ResNet18_Weights.IMAGENET1K_V1" in said

    trained = torch.load(run / "checkpoint_0001.pt", weights_only=False)
    # the backbone's LR is 0 in epoch 1 (--freeze-backbone-epochs 1): its parameters are the file's, bit for bit
    # (the BatchNorm running statistics follow the new data, as with --finetune-from)
    backbone = [name for name, _ in torchvision.models.resnet18().named_parameters() if not name.startswith("fc.")]
    assert all(torch.equal(trained["model"][name], published[name]) for name in backbone)
    assert trained["model"]["fc.weight"].shape == (CLASSES, 512) and published["fc.weight"].shape == (1000, 512)
    record = {"weights_file": str(cache), "weights_sha256": hashlib.sha256(cache.read_bytes()).hexdigest(),
              "weights_enum": "ResNet18_Weights.IMAGENET1K_V1",
              "weights_url": "https://download.pytorch.org/models/resnet18-f37072fd.pth"}
    recipe = json.loads((run / "recipe.json").read_text())
    assert {k: recipe[k] for k in record} == record and recipe["model"]["weights"] == "DEFAULT"
    assert {k: trained["recipe"][k] for k in record} == record

    cache.unlink()  # a resume starts from its checkpoint: the same command goes on without the file
    main([*flags, "--epochs", "2", "--resume", "auto"])
    resumed = torch.load(run / "checkpoint_0002.pt", weights_only=False)
    assert {k: resumed["recipe"][k] for k in record} == record
    assert not torch.equal(resumed["model"]["layer1.0.conv1.weight"], published["layer1.0.conv1.weight"])


def test_evaluate_takes_torchvision_weights_by_name(data_dir, tmp_path, monkeypatch):
    """rn50.evaluate's --weights PATH keeps working (the recipe's new `weights` field must not take it), and a
    name (no such file) is torchvision's weights of --arch from the hub cache."""
    from rn50.evaluate import main as evaluate

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    cache = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cache.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(num_classes=CLASSES).state_dict(), cache)  # fits the data's classes
    flags = ["--data", str(data_dir), "--arch", "resnet18", "--loader", "dali-cpu", "--image-size", "32",
             "--batch-size", "8", "--dali-threads", "1"]
    for weights, out in ((str(cache), tmp_path / "by-path"), ("DEFAULT", tmp_path / "by-name")):
        evaluate([*flags, "--weights", weights, "--out", str(out)])
        report = json.loads((out / "eval.json").read_text())
        assert report["weights"] == str(cache) and report["val/count"] == 44
