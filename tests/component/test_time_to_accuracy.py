"""Time to accuracy: the resolution schedule, the linear LR schedule, BlurPool, flip averaging, validation at
its own size and the budget presets, as pure functions and tiny models."""

from __future__ import annotations

import pytest
import torch

from pipelines.augmentation import Augmentation
from rn50.config.errors import UserError
from rn50.core.validation import evaluate
from rn50.core.model import _blur_input, add_blurpool, blurred_convolutions, build_model, count_parameters
from rn50.config.recipe import resolve, with_fields
from rn50.core.schedule import lr_at


def test_resolution_schedule_at_chosen_epochs():
    # FFCV's 16-epoch config: 160 px through epoch 11, 192 from 12 (the ramp 11 -> 13 rounds to 32 px steps)
    ffcv16 = Augmentation(image_size=160, min_res=160, max_res=192, start_ramp=11, end_ramp=13)
    assert ffcv16.train_sizes(16) == [160] * 12 + [192] * 4
    # a longer ramp passes through the 32 px steps between
    ramp = Augmentation(min_res=128, max_res=256, start_ramp=2, end_ramp=6)
    assert ramp.train_sizes(8) == [128, 128, 128, 160, 192, 224, 256, 256]
    # min_res defaults to image_size; off without max_res
    assert Augmentation(image_size=32, max_res=64, start_ramp=1, end_ramp=2).train_sizes(3) == [32, 32, 64]
    assert Augmentation(image_size=96).train_sizes(3) == [96, 96, 96]


@pytest.mark.parametrize("fields, message", [
    ({"min_res": 64, "max_res": 32, "end_ramp": 2}, "goes up"),
    ({"max_res": 256, "start_ramp": 3, "end_ramp": 3}, "must come after start_ramp"),
    ({"min_res": 64}, "min_res without max_res"),
    ({"val_image_size": -1}, "must not be negative"),
])
def test_resolution_fields_are_checked(fields, message):
    with pytest.raises(UserError, match=message):
        with_fields(**fields).validate()


def test_validation_size_defaults_to_the_training_size():
    assert Augmentation(image_size=160).val_size == 160
    assert Augmentation(image_size=160, val_image_size=256).val_size == 256


def test_linear_schedule_warms_up_then_falls_to_zero_at_the_last_epoch():
    schedule = with_fields(schedule="linear", epochs=10, warmup_epochs=2.0).schedule
    spe, peak = 4, 1.6
    assert lr_at(schedule, peak, 0, spe) == 0.0
    assert lr_at(schedule, peak, 4, spe) == pytest.approx(0.8)  # halfway up the warmup
    assert lr_at(schedule, peak, 8, spe) == pytest.approx(1.6)  # the peak at the end of the warmup
    assert lr_at(schedule, peak, 24, spe) == pytest.approx(0.8)  # epoch 6: halfway down (2 -> 10)
    assert lr_at(schedule, peak, 39, spe) == pytest.approx(1.6 * 0.25 / 8)  # the last step: nearly 0
    assert lr_at(schedule, peak, 40, spe) == 0.0
    with pytest.raises(UserError, match="linear schedule needs"):
        with_fields(schedule="linear", epochs=2, warmup_epochs=2.0).validate()


def test_blurpool_blurs_every_strided_convolution_without_new_parameters():
    plain, blurred = build_model("resnet50", 10), build_model("resnet50", 10)
    blurred.load_state_dict(plain.state_dict())
    names = add_blurpool(blurred)
    # conv2 and the downsample of the first block of layer2..4; not the stem's 3-channel conv1
    assert names == blurred_convolutions(plain) and len(names) == 6 and "conv1" not in names
    assert {"layer2.0.conv2", "layer2.0.downsample.0", "layer4.0.conv2"} <= set(names)
    assert count_parameters(blurred) == count_parameters(plain)
    assert blurred.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay torchvision's
    plain.eval(), blurred.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out_plain, out_blurred = plain(x), blurred(x)
    assert out_blurred.shape == out_plain.shape and not torch.allclose(out_blurred, out_plain)


def test_blurpool_filter_is_a_normalised_binomial_blur():
    model = build_model("resnet18", 4)
    add_blurpool(model)
    conv = model.get_submodule("layer2.0.conv1")
    kernel = conv.blur_filter[0, 0]
    assert torch.equal(kernel, torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16.0)
    assert conv.blur_filter.shape[0] == conv.in_channels  # depthwise: one filter per input channel
    # a constant input stays constant inside the border, at the same size: the blur averages, it does not
    # scale or downsample (the convolution after it strides)
    (blurred,) = _blur_input(conv, (torch.ones(1, conv.in_channels, 8, 8),))
    assert blurred.shape == (1, conv.in_channels, 8, 8)
    assert torch.allclose(blurred[..., 1:-1, 1:-1], torch.ones(1)) and blurred[0, 0, 0, 0] == pytest.approx(9 / 16)


def test_flip_averaging_is_the_mean_of_the_two_logits():
    torch.manual_seed(0)
    model = build_model("resnet18", 5).eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        expected = (model(images) + model(torch.flip(images, dims=[3]))) / 2
    result = evaluate(model, [(images, labels)], flip=True)
    loss = torch.nn.functional.cross_entropy(expected, labels).item()
    assert result["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert result["val/top1"] == pytest.approx(100 * (expected.argmax(1) == labels).float().mean().item())
    assert evaluate(model, [(images, labels)])["val/loss"] != pytest.approx(loss, rel=1e-5)  # flip changes it


@pytest.mark.parametrize("epochs, ramp", [(16, (11, 13)), (24, (17, 20)), (32, (23, 27)), (40, (29, 34)),
                                          (56, (41, 48)), (88, (65, 76))])
def test_budget_presets_mirror_ffcvs_configs(epochs, ramp):
    recipe = resolve({"preset": f"ffcv_{epochs}_epochs"}).recipe
    aug = recipe.augmentation
    assert recipe.schedule.epochs == epochs and recipe.schedule.kind == "linear"
    assert (aug.min_res, aug.max_res, aug.start_ramp, aug.end_ramp) == (160, 192, *ramp)
    assert aug.val_size == 256 and aug.val_flip and recipe.model.blurpool
    assert recipe.optimisation.peak_lr(8) == pytest.approx(1.7)  # FFCV's LR at 8 x 512
    sizes = aug.train_sizes(epochs)
    assert sizes[0] == 160 and sizes[-1] == 192 and sizes == sorted(sizes)


PROGRESSIVE = Augmentation(image_size=32, max_res=64, start_ramp=1, end_ramp=2, val_image_size=48)


def progressive_loader(kind, split, data_dir, **options):
    from pipelines import build_loader

    return build_loader(kind, split, data_dir, batch_size=8, image_size=32, seed=3, augmentation=PROGRESSIVE,
                        dali_threads=1, workers=0, **options)


@pytest.mark.parametrize("kind", ["dali-cpu", "torchvision", "synthetic"])
def test_training_size_follows_the_schedule_and_validation_its_own_size(kind, data_dir):
    train = progressive_loader(kind, "train", data_dir)
    seen = []
    for epoch in range(3):
        train.set_epoch(epoch)
        seen.append({tuple(images.shape[-2:]) for images, _ in train})
    assert seen == [{(32, 32)}, {(32, 32)}, {(64, 64)}]
    val = progressive_loader(kind, "val", data_dir)
    assert {tuple(images.shape[-2:]) for images, _ in val} == {(48, 48)}


def test_dali_resume_across_a_resolution_change_is_exact(data_dir):
    """Stopped mid-epoch 1 (32 px), resumed in a new loader: the rest of epoch 1 and epoch 2 (64 px) are
    the same batches, pixel for pixel, as without the stop."""
    def run(loader, first_epoch=0, stop_at=None):
        batches = []
        for epoch in range(first_epoch, 3):
            loader.set_epoch(epoch)
            for step, (images, labels) in enumerate(loader):
                batches.append((images.clone(), labels.clone()))
                if (epoch, step + 1) == stop_at:
                    return batches, loader.state_dict()
        return batches, None

    straight, _ = run(progressive_loader("dali-cpu", "train", data_dir))
    before, state = run(progressive_loader("dali-cpu", "train", data_dir), stop_at=(1, 2))
    resumed = progressive_loader("dali-cpu", "train", data_dir)
    resumed.load_state_dict(state)
    after, _ = run(resumed, first_epoch=1)
    got = before + after
    assert [tuple(i.shape[-2:]) for i, _ in got] == [tuple(i.shape[-2:]) for i, _ in straight]
    assert {tuple(i.shape[-2:]) for i, _ in after} == {(32, 32), (64, 64)}  # the change falls after the resume
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, straight))


def test_schedule_estimate_takes_each_epoch_at_its_resolutions_speed():
    from benchmarks.figures import IMAGENET_TRAIN, IMAGENET_VAL, time_to_train_schedule

    recipe = resolve({"preset": "ffcv_16_epochs"}).recipe  # 12 epochs at 160 px, 4 at 192, validation 256 with flips
    rows = [{"image_size": 160, "mode": "train", "loader": "dali", "img_per_s": 10_000.0},
            {"image_size": 192, "mode": "train", "loader": "dali", "img_per_s": 8_000.0},
            {"image_size": 160, "mode": "synthetic", "loader": "synthetic", "img_per_s": 12_000.0}]
    estimates = time_to_train_schedule(recipe, rows)["estimates"]
    dali = estimates["dali"]
    # by hand: 12 x 1,281,167 / 10,000 + 4 x 1,281,167 / 8,000 seconds
    assert dali["train_hours"] == pytest.approx((12 * 128.1167 + 4 * 160.145875) / 3600)
    # validation: 16 x 50,000 / (3 x 10,000) s, x (256/160)^2 pixels, x 2 for the flips
    assert dali["validation_hours_estimated"] == pytest.approx(16 * 50_000 / 30_000 * 2.56 * 2 / 3600)
    assert dali["epochs_per_resolution"] == {160: 12, 192: 4}
    assert "synthetic" not in estimates  # no figure at 192 px: no estimate rather than a guess
    assert IMAGENET_TRAIN == 1_281_167 and IMAGENET_VAL == 50_000


def test_a_short_progressive_run_records_its_resolutions_and_counts_every_validation_image(data_dir, tmp_path):
    import json

    from conftest import N_VAL_IMAGES
    from rn50.train import main

    out = tmp_path / "run"
    main(["--data", str(data_dir), "--out", str(out), "--loader", "dali-cpu", "--arch", "resnet18",
          "--batch-size", "8", "--dali-threads", "1", "--epochs", "3", "--warmup-epochs", "1", "--schedule", "linear",
          "--min-res", "32", "--max-res", "64", "--start-ramp", "1", "--end-ramp", "2", "--val-image-size", "48",
          "--val-flip", "--blurpool"])
    epochs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val/count" in r]
    assert [r["train/resolution"] for r in epochs] == [32, 32, 64]
    assert all(r["val/count"] == N_VAL_IMAGES for r in epochs)
    assert epochs[-1]["lr"] < epochs[0]["lr"]  # the linear schedule on its way down to 0
