"""The torchvision-gpu loader (the CPU as its device here) and its batched resampler; dali-hybrid's refusal
without CUDA. The GPU runs of both are in test_gpu.py."""

from __future__ import annotations

import math
import shutil
import sys

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from pipelines import build_loader, check_device
from pipelines.errors import UserError
from pipelines.folder import list_split
from pipelines.resample import resized_crops, size_groups
from pipelines.torchvision_gpu import centre_crops, random_resized_boxes

from conftest import N_TRAIN_IMAGES as N_TRAIN, N_VAL_IMAGES as N_VAL


def loader(kind, split, data, **kw):
    return build_loader(kind, split, data, **{"batch_size": 8, "image_size": 32, "workers": 1, **kw})


def epoch(out, number=0):
    out.set_epoch(number)
    return [(x.clone(), y.clone()) for x, y in out]


def smooth_images(shapes, seed=0):
    """uint8 CHW images with detail at several scales (blurred noise), like photographs more than noise."""
    generator = torch.Generator().manual_seed(seed)
    return [F.gaussian_blur(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator), 5)
            for h, w in shapes]


SHAPES = [(48, 64), (64, 50), (33, 41), (60, 60), (97, 31), (20, 25)]


# --- the resampler: torchvision's resize, many images at once -----------------------------------------

def test_validation_resize_and_centre_crop_equal_torchvisions():
    images = smooth_images(SHAPES)
    expected = torch.stack([F.center_crop(F.resize(image, 36, antialias=True), 32).float() for image in images])
    heights, widths = torch.tensor([s[0] for s in SHAPES]), torch.tensor([s[1] for s in SHAPES])
    resized, corners = centre_crops(heights, widths, 36, 32)
    for image, size in zip(images, resized.tolist()):  # the sizes are torchvision's too
        assert list(F.resize(image, 36, antialias=True).shape[1:]) == size
    got = resized_crops(images, resized, corners, 32)
    # PyTorch's uint8 resize uses fixed-point weights: a level here and there, never more. A wrong filter
    # (no antialias, another support) or a crop off by a pixel is several levels on average.
    assert (got - expected).abs().max() <= 1
    assert (got - expected).abs().mean() < 0.1, (got - expected).abs().mean()


@pytest.mark.parametrize("box", [(3, 5, 15, 18), (0, 0, 20, 25), (10, 2, 8, 9)])  # all fit the 20 x 25 image
def test_crops_resized_up_and_down_equal_torchvisions_resized_crop(box):
    top, left, h, w = box
    images = smooth_images(SHAPES, seed=1)
    crops = [image[:, top:top + h, left:left + w] for image in images]
    expected = torch.stack([F.resized_crop(image, top, left, h, w, [32, 32], antialias=True).float()
                            for image in images])
    got = resized_crops(crops, torch.full((len(crops), 2), 32), torch.zeros(len(crops), 2, dtype=torch.long), 32)
    assert (got - expected).abs().max() <= 1 and (got - expected).abs().mean() < 0.1


def test_size_groups_cover_every_image_once_under_the_budget():
    shapes = [(500, 375), (375, 500), (2000, 3000), (64, 64), (333, 500), (32, 900)]
    groups = size_groups(shapes, channels=3, budget=3 * 600 * 600 * 2)
    assert sorted(i for group in groups for i in group) == list(range(len(shapes)))
    for group in groups:
        h, w = max(shapes[i][0] for i in group), max(shapes[i][1] for i in group)
        assert len(group) == 1 or len(group) * 3 * h * w <= 3 * 600 * 600 * 2, (group, h, w)
    assert [2] in groups  # the huge image alone, not padding every other image to its size
    assert len(size_groups(shapes, channels=3)) == 1  # the default budget: one group for a normal batch


def test_group_budget_changes_nothing_in_the_pixels():
    images = smooth_images(SHAPES, seed=2)
    heights, widths = torch.tensor([s[0] for s in SHAPES]), torch.tensor([s[1] for s in SHAPES])
    resized, corners = centre_crops(heights, widths, 36, 32)
    one = resized_crops(images, resized, corners, 32)
    many = resized_crops(images, resized, corners, 32, budget=1)  # one image per group
    assert torch.equal(one, many)


# --- RandomResizedCrop parameters, torchvision's rules for a whole batch --------------------------------

def test_crop_boxes_follow_torchvisions_rules():
    generator = torch.Generator().manual_seed(0)
    heights, widths = torch.tensor([375, 500, 64, 1000] * 500), torch.tensor([500, 375, 48, 200] * 500)
    boxes = random_resized_boxes(heights, widths, (0.08, 1.0), (3 / 4, 4 / 3), generator)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= heights).all() and (left + w <= widths).all()
    area = (h * w).double() / (heights * widths)
    ratio = w.double() / h
    fitted = (area >= 0.079) & (area <= 1.0)
    assert fitted.float().mean() > 0.97  # the rest fell back to the centre crop
    assert ((ratio > 3 / 4 * 0.9) & (ratio < 4 / 3 * 1.1))[fitted].all()
    # the same distribution as torchvision's own: the mean crop area over many draws (0.54 for U(0.08, 1)
    # less the tries that do not fit; a range of area or ratio read wrongly moves it by 0.1 or more)
    torch.manual_seed(0)
    reference = []
    for hh, ww in zip(heights.tolist()[:800], widths.tolist()[:800]):
        _, _, rh, rw = RandomResizedCrop.get_params(torch.empty(1, hh, ww), [0.08, 1.0], [3 / 4, 4 / 3])
        reference.append(rh * rw / (hh * ww))
    assert abs(area[:800].mean().item() - sum(reference) / len(reference)) < 0.04
    # the crops land all over the image, not in one corner
    assert (top.double() / (heights - h).clamp(min=1)).std() > 0.2


def test_crop_boxes_fall_back_to_the_centre_as_torchvision_does():
    # a 1 x 100 strip: no crop of ratio 3/4..4/3 with 8%+ of its area fits; torchvision takes the centre with
    # the ratio clamped: h = 1, w = round(1 * 4/3) = 1
    generator = torch.Generator().manual_seed(0)
    boxes = random_resized_boxes(torch.tensor([1, 100]), torch.tensor([100, 1]), (0.08, 1.0), (3 / 4, 4 / 3),
                                 generator)
    assert boxes.tolist() == [[0, 49, 1, 1], [49, 0, 1, 1]]


# --- the loader -----------------------------------------------------------------------------------------

def test_validation_matches_the_torchvision_loader_within_the_dali_tolerance(data_dir):
    ours = torch.cat([x for x, _ in loader("torchvision-gpu", "val", data_dir)])
    theirs = torch.cat([x for x, _ in loader("torchvision", "val", data_dir, workers=0)])
    assert ours.shape == theirs.shape == (N_VAL, 3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.005, (ours - theirs).abs().mean()


def test_output_contract_and_the_torchvision_loaders_order(data_dir):
    out = loader("torchvision-gpu", "train", data_dir, dtype=torch.float16)
    assert len(out) == N_TRAIN // 8 and out.num_samples == N_TRAIN
    images, labels = next(iter(out))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float16
    assert images.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64
    # the same DistributedSampler order as the torchvision baseline, epoch by epoch
    baseline = loader("torchvision", "train", data_dir, workers=0, rank=1, world_size=2)
    ours = loader("torchvision-gpu", "train", data_dir, rank=1, world_size=2)
    for number in (0, 1):
        assert [y.tolist() for _, y in epoch(ours, number)] == [y.tolist() for _, y in epoch(baseline, number)]


def test_augmentation_differs_between_epochs_and_images(data_dir, tmp_path):
    source = list_split(str(data_dir), "train").files[0]
    (tmp_path / "train" / "c0").mkdir(parents=True)
    (tmp_path / "val" / "c0").mkdir(parents=True)
    for i in range(8):
        shutil.copy(source, tmp_path / "train" / "c0" / f"{i}.JPEG")
    shutil.copy(source, tmp_path / "val" / "c0" / "0.JPEG")
    out = loader("torchvision-gpu", "train", tmp_path, color_jitter=0.0)
    (a, _), = epoch(out, 0)
    (b, _), = epoch(out, 1)
    # normalised units; as the DALI test measures: a real re-crop is 0.2 and up, float noise far below 0.1
    assert (a - b).abs().mean(dim=(1, 2, 3)).min() > 0.1
    within = torch.stack([(a[i] - a[j]).abs().mean() for i in range(8) for j in range(i + 1, 8)])
    assert within.min() > 0.1


def test_a_resumed_epoch_continues_with_the_same_batches_and_augmentations(data_dir):
    first = loader("torchvision-gpu", "train", data_dir, batch_size=4)
    full = epoch(first, 3)
    first.set_epoch(3)
    iterator = iter(first)
    next(iterator), next(iterator)  # two steps trained, then the checkpoint
    state = first.state_dict()
    assert state == {"epoch": 3, "position": 2}
    resumed = loader("torchvision-gpu", "train", data_dir, batch_size=4)
    resumed.load_state_dict(state)
    rest = [(x.clone(), y.clone()) for x, y in resumed]
    assert len(rest) == len(full) - 2
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(rest, full[2:]))
    assert resumed.position == 0  # the epoch ended: the next starts at its beginning


def test_progressive_resizing_changes_the_crop_size_by_epoch(data_dir):
    out = loader("torchvision-gpu", "train", data_dir, min_res=32, max_res=64, start_ramp=0, end_ramp=1)
    assert epoch(out, 0)[0][0].shape[-1] == 32
    assert epoch(out, 1)[0][0].shape[-1] == 64


def test_png_and_misnamed_files_are_read_by_content(data_dir, tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        shutil.copytree(data_dir / split, tmp_path / split)
    val_dir = tmp_path / "val" / sorted(p.name for p in (tmp_path / "val").iterdir())[0]
    first = sorted(val_dir.iterdir())[0]
    with Image.open(first) as image:
        image.convert("RGB").save(val_dir / "extra.png")  # a PNG with its own suffix
    ours = torch.cat([x for x, _ in loader("torchvision-gpu", "val", tmp_path)])
    theirs = torch.cat([x for x, _ in loader("torchvision", "val", tmp_path, workers=0)])
    assert ours.shape[0] == N_VAL + 1 and (ours - theirs).abs().mean() < 0.005


def test_dali_only_augmentations_are_refused(data_dir):
    with pytest.raises(UserError, match="inside the DALI pipelines"):
        loader("torchvision-gpu", "train", data_dir, randaugment_magnitude=7)


def test_dali_hybrid_without_cuda_is_one_line(data_dir):
    with pytest.raises(UserError) as error:
        loader("dali-hybrid", "train", data_dir)
    message = str(error.value)
    assert "dali-hybrid" in message and "CUDA is not available" in message and "--loader dali-cpu" in message
    assert "\n" not in message
    check_device("torchvision-gpu", "cpu")  # runs on the CPU: no error


def test_a_torchvision_without_its_jpeg_decoder_and_no_torchcodec_is_one_clear_error(data_dir, monkeypatch):
    import torchvision.io

    monkeypatch.setitem(sys.modules, "torchcodec", None)  # not installed
    monkeypatch.delattr(torchvision.io, "decode_jpeg")  # as in a torchvision that dropped its decoders
    with pytest.raises(UserError, match="has no torchvision.io.decode_jpeg.*pip install torchcodec.*--loader dali or "
                                        "torchvision"):
        loader("torchvision-gpu", "train", data_dir)


def test_steps_per_epoch_are_torchvisions(data_dir):
    for world, batch in ((1, 8), (3, 5), (2, 7)):
        ours = [len(loader("torchvision-gpu", "train", data_dir, rank=r, world_size=world, batch_size=batch))
                for r in range(world)]
        assert ours == [math.floor(N_TRAIN // world / batch)] * world
