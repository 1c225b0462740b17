"""Beyond the 90-epoch recipe: cosine schedule, AdamW/LAMB, plateau, EMA, Mixup/CutMix, distillation,
fine-tuning with a replaced head, early stopping, time-to-accuracy and TensorBoard event files."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rn50.system.dist import DistEnv
from rn50.core.losses import batch_mixing, distillation_loss
from rn50.config.recipe import with_fields
from rn50.core.schedule import PlateauMultiplier, lr_at
from rn50.core.step import WeightEma, build_training, train_step
from rn50.train import main

from conftest import CLASSES

SPE = 100
CPU = DistEnv(0, 1, 0, torch.device("cpu"))
SMALL = ["--loader", "dali-cpu", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--dali-threads", "1",
         "--warmup-epochs", "0", "--log-every", "3"]


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),                                   # warmup from 0
    (500, 0.1),                                 # the peak after 5 warmup epochs
    (500 + 2500, 0.001 + 0.5 * (0.1 - 0.001)),  # half-way through the 50-epoch cosine: the mean of peak and floor
    (500 + 1250, 0.001 + 0.5 * (0.1 - 0.001) * (1 + math.cos(math.pi / 4))),
    (5500, 0.001),                              # end of the cosine phase
    (5999, 0.001),                              # the cooldown holds min_lr
])
def test_cosine_with_warmup_and_cooldown(step, expected):
    recipe = with_fields(schedule="cosine", epochs=60, warmup_epochs=5, cooldown_epochs=5, min_lr=0.001)
    assert lr_at(recipe.schedule, 0.1, step, SPE) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_plateau_multiplier_drops_after_patience():
    plateau = PlateauMultiplier(with_fields(schedule="plateau", plateau_factor=0.5, plateau_patience=1).schedule)
    for loss, expected in [(1.0, 1.0), (0.9, 1.0), (0.95, 1.0), (0.95, 0.5), (0.95, 0.5), (0.95, 0.25)]:
        plateau.step(loss)
        assert plateau.value == pytest.approx(expected)
    state = plateau.state_dict()
    again = PlateauMultiplier(with_fields(schedule="plateau", plateau_factor=0.5, plateau_patience=1).schedule)
    again.load_state_dict(state)
    assert again.value == pytest.approx(0.25)


@pytest.mark.parametrize("name, kind", [("adamw", torch.optim.AdamW), ("lamb", None), ("sgd", torch.optim.SGD)])
def test_optimizers_keep_the_no_decay_groups(name, kind):
    parts = build_training(with_fields(arch="resnet18", optimizer=name, batch_size=4), CLASSES, CPU)
    if kind is not None:
        assert isinstance(parts.optimizer, kind)
    else:
        from timm.optim import Lamb

        assert isinstance(parts.optimizer, Lamb)
    decays = {g["name"]: g["weight_decay"] for g in parts.optimizer.param_groups}
    assert decays == {"decay": 1e-4, "no_decay": 0.0, "decay_head": 1e-4, "no_decay_head": 0.0}


def test_ema_update_follows_its_formula():
    parts = build_training(with_fields(arch="resnet18", ema_decay=0.9, batch_size=4), CLASSES, CPU)
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4) % CLASSES
    for group in parts.optimizer.param_groups:
        group["lr"] = 0.1
    train_step(parts, images, labels)
    first = {k: v.clone() for k, v in parts.raw_model.state_dict().items()}
    assert all(torch.equal(parts.ema.module.state_dict()[k], v) for k, v in first.items())  # first update: copy
    train_step(parts, images, labels)
    second = parts.raw_model.state_dict()
    ema = parts.ema.module.state_dict()
    name = "layer1.0.conv1.weight"
    assert torch.allclose(ema[name], 0.9 * first[name] + 0.1 * second[name], atol=1e-6)
    assert not torch.equal(ema[name], second[name])


def small_bn_model(device="cpu", layers=1) -> torch.nn.Module:
    torch.manual_seed(0)  # float weights, float BN statistics and an integer buffer (num_batches_tracked) each
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), *(torch.nn.BatchNorm2d(4) for _ in range(layers))).to(device)


@pytest.mark.parametrize("layers", [1, 3])
def test_ema_values_and_state_are_torch_averaged_models_bit_for_bit(layers):
    """WeightEma keeps today's EMA: the values of AveragedModel(get_ema_multi_avg_fn, use_buffers=True),
    bit for bit (the same elementwise ops on the same inputs), and the same checkpoint keys; with several BN
    counters, averaged together, each counter its own."""
    model = small_bn_model(layers=layers)
    ours = WeightEma(model, 0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        with torch.no_grad():  # the model moves between updates, as training moves it
            for n, bn in enumerate(model[1:], start=1):
                for tensor in [bn.weight, bn.bias, bn.running_mean, bn.running_var]:
                    tensor.add_(torch.randn(tensor.shape, generator=generator))
                bn.num_batches_tracked += 7 * n
            model[0].weight.add_(torch.randn(model[0].weight.shape, generator=generator))
        ours.update_parameters(model)
        theirs.update_parameters(model)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and "n_averaged" in a
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (key, a[key], b[key])
    counters = [int(a[f"module.{n}.num_batches_tracked"]) for n in range(1, layers + 1)]
    assert int(a["n_averaged"]) == 4 and len(set(counters)) == layers and min(counters) > 0, counters


class DeviceKernels(TorchDispatchMode):
    """Records the ops on "meta" tensors (the stand-in GPU) that would launch a kernel there: views launch none."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(t.device.type == "meta" for t in tensors) and not func.is_view:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_ema_update_runs_as_many_kernels_whatever_the_number_of_bn_layers():
    """Each op an update dispatches is a kernel launch on the GPU (the "meta" device stands in: it dispatches
    every op and runs none). The BN counters were averaged one by one, four launches per BN layer (212 per
    ResNet-50 step); averaged together, an update's launches do not grow with the layers."""
    counts = {}
    for layers in (1, 12):
        model = small_bn_model("meta", layers)
        ema = WeightEma(model, 0.9)
        ema.update_parameters(model)  # the first update copies; the averaging ones follow
        with DeviceKernels() as mode:
            ema.update_parameters(model)
        counts[layers] = mode.ops
    assert len(counts[12]) == len(counts[1]) <= 8, counts


class CrossDeviceOps(TorchDispatchMode):
    """Records every op that touches tensors on two devices: a host<->device copy when one is the CPU."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = {t.device.type for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            self.seen.append((str(func), sorted(devices)))
        return out


def test_ema_update_copies_nothing_between_host_and_device():
    """The "meta" device stands in for the GPU (it runs no kernels, but every op still dispatches on it):
    torch's AveragedModel copies n_averaged from the host to the device every update (a blocking pageable
    copy on CUDA); WeightEma keeps the count on the host and copies nothing, even after .to(device)."""
    model = small_bn_model("meta")
    ours = WeightEma(small_bn_model(), 0.9).to("meta")
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    assert ours.n_averaged.device.type == "cpu" and next(ours.module.parameters()).device.type == "meta"
    for ema, expected in ((theirs, "aten._to_copy"), (ours, None)):
        with CrossDeviceOps() as mode:
            for _ in range(3):
                ema.update_parameters(model)
        if expected is None:
            assert mode.seen == [], mode.seen
        else:  # the check sees the copy it guards against (one per dtype group of each averaging update)
            assert len(mode.seen) >= 2 and all(expected in op for op, _ in mode.seen), mode.seen
    assert int(ours.n_averaged) == 3 and ours.n_averaged.device.type == "cpu"


@pytest.mark.gpu
def test_ema_update_does_not_synchronise_the_gpu():
    model = small_bn_model("cuda")
    ema = WeightEma(model, 0.9)
    ema.update_parameters(model)  # the first update copies
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync (a pageable copy too) raises
    try:
        for _ in range(3):
            ema.update_parameters(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(4):
        reference.update_parameters(model)
    assert all(torch.equal(a, b.to(a.device)) for a, b in zip(ema.state_dict().values(),
                                                              reference.state_dict().values()))


def test_mixup_and_cutmix_targets_sum_to_one_and_cutmix_area_matches():
    torch.manual_seed(0)
    labels = torch.arange(8) % CLASSES
    mixup = batch_mixing(0.2, 0.0, CLASSES)
    _, targets = mixup(torch.randn(8, 3, 32, 32), labels)
    assert targets.shape == (8, CLASSES) and torch.allclose(targets.sum(1), torch.ones(8))
    cutmix = batch_mixing(0.0, 1.0, CLASSES)
    # every image a different constant: the pasted box is recognisable pixel by pixel
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 32, 32).contiguous()
    for _ in range(5):
        mixed, targets = cutmix(images.clone(), labels)
        assert torch.allclose(targets.sum(1), torch.ones(8))
        for i in range(8):
            kept = (mixed[i] == i).float().mean().item()  # share of image i still its own
            own = targets[i, labels[i]].item()
            partner = targets[i].clone()
            partner[labels[i]] = 0
            if partner.sum() > 0:  # the partner has another class: its weight is the pasted area
                assert partner.sum().item() == pytest.approx(1 - kept, abs=1e-6)
            assert own == pytest.approx(kept, abs=1e-6) or partner.sum() == 0


def test_distillation_loss_matches_its_formula():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, CLASSES), torch.randn(6, CLASSES)
    labels = torch.arange(6) % CLASSES
    hard = F.cross_entropy(student, labels)
    t = 2.0
    p_teacher = F.softmax(teacher / t, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, dim=1))).sum(1).mean()
    expected = 0.8 * t * t * kl + 0.2 * hard
    assert distillation_loss(student, teacher, hard, 0.8, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(student, student, hard, 1.0, t).item() == pytest.approx(0.0, abs=1e-6)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_distillation_run_with_a_teacher_checkpoint(data_dir, tmp_path):
    teacher = tmp_path / "teacher"
    main(["--data", str(data_dir), "--out", str(teacher), "--epochs", "1", *SMALL])
    student = tmp_path / "student"
    main(["--data", str(data_dir), "--out", str(student), "--epochs", "1", *SMALL, "--kd-teacher",
          str(teacher / "checkpoint_0001.pt"), "--kd-teacher-arch", "resnet18", "--kd-temperature", "2",
          "--ema-decay", "0.9", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"])
    last = records(student)[-1]
    assert last["val/count"] == 44 and "val_ema/top1" in last and math.isfinite(last["train/loss"])


def test_finetune_replaces_the_head_and_freezes_the_backbone_first(data_dir, tmp_path):
    from tools.make_dataset import make_dataset

    source = tmp_path / "source"
    main(["--data", str(data_dir), "--out", str(source), "--epochs", "1", *SMALL])
    new_data = tmp_path / "new-data"  # a new task: 3 classes instead of 4
    make_dataset(new_data, 3, 8, 4, seed=11, min_side=40, max_side=48)
    tuned = tmp_path / "tuned"
    main(["--data", str(new_data), "--out", str(tuned), "--epochs", "2", *SMALL, "--finetune-from",
          str(source / "checkpoint_0001.pt"), "--freeze-backbone-epochs", "1"])
    before = torch.load(source / "checkpoint_0001.pt")["model"]
    after_1 = torch.load(tuned / "checkpoint_0001.pt")["model"]
    after_2 = torch.load(tuned / "checkpoint_0002.pt")["model"]
    assert after_1["fc.weight"].shape == (3, 512)
    assert torch.equal(before["layer1.0.conv1.weight"], after_1["layer1.0.conv1.weight"])  # frozen in epoch 1
    assert not torch.equal(after_1["layer1.0.conv1.weight"], after_2["layer1.0.conv1.weight"])  # trained in 2
    assert records(tuned)[-1]["val/count"] == 12


def test_early_stopping_and_target_top1(data_dir, tmp_path):
    stopped = tmp_path / "early"
    main(["--data", str(data_dir), "--out", str(stopped), "--epochs", "8", *SMALL, "--base-lr", "0",
          "--early-stop-patience", "2",  # LR 0: only the BN statistics move, top-1 soon stops improving
          "--keep-checkpoints", "1"])  # stopping reads the history, not the checkpoints (90 MB each)
    epochs = [r for r in records(stopped) if "val/top1" in r]
    top1 = [r["val/top1"] for r in epochs]

    def should_stop(n):  # the rule after n epochs: the (latest) best top-1 is at least 2 epochs old
        epochs_since_best = top1[:n][::-1].index(max(top1[:n]))
        return epochs_since_best >= 2

    expected = next(n for n in range(1, 9) if n == 8 or should_stop(n))
    assert len(epochs) == expected < 8
    assert "no better validation top-1 for 2 epochs" in epochs[-1]["stop"]
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["stopped_early"] and summary["epochs_run"] == expected
    target = tmp_path / "target"
    main(["--data", str(data_dir), "--out", str(target), "--epochs", "5", *SMALL, "--target-top1", "1"])
    summary = json.loads((target / "summary.json").read_text())
    assert summary["target"]["epochs"] == 1 and summary["target"]["time_s"] > 0 and summary["epochs_run"] == 1


def test_tensorboard_event_files_read_back_with_tensorboards_reader(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    main(["--data", str(data_dir), "--out", str(run), "--epochs", "2", *SMALL, "--keep-checkpoints", "1"])
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("lr", "train/loss", "train/img_per_s", "train/host_wait_frac", "val/top1", "val/top5", "val/count"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("val/top1")] == [6, 12]
    assert [e.value for e in events.Scalars("val/count")] == [44, 44]
    assert "train/inputs" in tags["images"] and len(events.Images("train/inputs")) == 2


def test_named_presets_resolve_as_documented():
    from rn50.config.recipe import available_presets, resolve
    from rn50.config.describe import format_recipe

    assert {"kd_lamb_610", "finetune"} <= set(available_presets())
    kd = resolve({"preset": "kd_lamb_610"}).recipe
    s, o, a, reg = kd.schedule, kd.optimisation, kd.augmentation, kd.regularisation
    assert (o.optimizer, s.kind, s.epochs, s.warmup_epochs, s.cooldown_epochs) == ("lamb", "cosine", 610, 5, 10)
    assert o.peak_lr(world_size=8) == pytest.approx(5e-3) and o.batch_size * 8 == 1536
    # SuperGradients' rand-m7-mstd0.5 on timm's 0-10 scale, on DALI's 0-30 bins; no colour jitter beside it
    assert (a.repeated_aug, a.randaugment_magnitude, a.randaugment_magnitude_std, a.color_jitter) == (3, 21, 1.5, 0.0)
    assert reg.ema_decay > 0 and reg.mixup_alpha > 0 and reg.cutmix_alpha > 0 and kd.distillation.alpha == 0.8
    # the cosine ends at epoch 600, then 10 epochs at the floor
    peak = o.peak_lr(8)
    assert lr_at(s, peak, 600 * SPE, SPE) == pytest.approx(s.min_lr)
    assert lr_at(s, peak, 300 * SPE, SPE) > lr_at(s, peak, 500 * SPE, SPE) > s.min_lr
    tune = resolve({"preset": "finetune"}).recipe
    assert (tune.optimisation.optimizer, tune.schedule.kind, tune.model.freeze_backbone_epochs,
            tune.stopping.early_stop_patience) == ("adamw", "plateau", 1, 5)
    assert "optimizer = \"lamb\"" in format_recipe(kd)  # printed in full when chosen


def test_finetune_from_a_torchvision_state_dict(tmp_path):
    import torchvision

    from rn50.config.errors import UserError
    from rn50.core.model import build_model, load_weights

    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")  # torchvision's own format
    model = build_model("resnet18", CLASSES)
    replaced = load_weights(model, str(tmp_path / "resnet18.pth"), replace_classifier=True)
    assert replaced == ["fc.weight", "fc.bias"] and model.fc.out_features == CLASSES
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    with pytest.raises(UserError, match="does not fit"):
        load_weights(build_model("resnet50", CLASSES), str(tmp_path / "resnet18.pth"), replace_classifier=True)
