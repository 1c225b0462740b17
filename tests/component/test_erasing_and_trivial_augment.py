"""Random erasing (torchvision's RandomErasing rule, after normalisation) and TrivialAugment-wide on the loaders that
augment: real DALI CPU operators, the torchvision loader's transforms, torchvision-gpu's batched ops on the CPU."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from pipelines import build_loader
from pipelines.erasing import RATIO, SCALE, TRIES, erase, erase_boxes
from pipelines.errors import UserError

SIZE = 32
AREA = SIZE * SIZE
ERASING_LOADERS = ("dali-cpu", "torchvision", "torchvision-gpu")


def loader(kind, data, **kw):
    return build_loader(kind, "train", data, **{"batch_size": 8, "image_size": SIZE, "dali_threads": 1,
                                                "workers": 0, **kw})


def erased_regions(images: torch.Tensor) -> torch.Tensor:
    """[N, H, W]: the pixels that are 0 in every channel. No pixel of a real image normalises to exactly 0: the
    ImageNet means are 123.675, 116.28 and 103.53 on 0-255 pixels, never an integer, and every loader's pixels
    before normalisation are whole numbers on 0-255 (uint8 crops, jitter and TrivialAugment)."""
    return (images.float() == 0).all(dim=1)


def fits_probability() -> float:
    """The probability that one try of the rule fits in a SIZE x SIZE image (h < SIZE and w < SIZE after rounding),
    by the midpoint rule on a 1000 x 1000 grid of (share, log ratio): independent of the code under test."""
    steps = 1000
    share = SCALE[0] + (torch.arange(steps, dtype=torch.float64) + 0.5) * (SCALE[1] - SCALE[0]) / steps
    logs = math.log(RATIO[0]) + (torch.arange(steps, dtype=torch.float64) + 0.5) * math.log(RATIO[1] / RATIO[0]) / steps
    s, r = share[:, None] * AREA, torch.exp(logs)[None, :]
    return ((torch.round(torch.sqrt(s * r)) < SIZE) & (torch.round(torch.sqrt(s / r)) < SIZE)).double().mean().item()


def share_bounds() -> tuple[float, float]:
    """The erased share of the image that the rule allows: S = share x area with share in SCALE, each side rounded
    by at most half a pixel, so h x w lies within S -+ (sqrt(S r) + sqrt(S / r)) / 2 + 1/4, and sqrt(S r) + sqrt(S / r)
    is at most sqrt(S) (sqrt(3.3) + 1 / sqrt(3.3)) over the ratios allowed."""
    k = math.sqrt(RATIO[1]) + 1 / math.sqrt(RATIO[1])
    low, high = SCALE[0] * AREA, SCALE[1] * AREA
    return (low - math.sqrt(low) * k / 2 + 0.25) / AREA, (high + math.sqrt(high) * k / 2 + 0.25) / AREA


def check_erasing_statistics(images: torch.Tensor, p: float) -> None:
    """Per image: erased (some pixel 0 in every channel) or not; an erased region is one rectangle whose share of
    the image lies in the rule's range; the fraction erased is p x P(one of 10 tries fits) within a binomial
    tolerance of 4.5 standard deviations (a correct loader fails it with probability below 1e-5)."""
    regions = erased_regions(images)
    erased = regions.flatten(1).any(1)
    n, expected = len(images), p * (1 - (1 - fits_probability()) ** TRIES)
    tolerance = 4.5 * math.sqrt(n * expected * (1 - expected))
    assert abs(erased.sum().item() - n * expected) <= tolerance, (erased.sum().item(), n * expected, tolerance)
    low, high = share_bounds()
    for region in regions[erased]:
        rows, cols = region.any(1).nonzero()[:, 0], region.any(0).nonzero()[:, 0]
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert region.sum() == height * width, "the erased pixels are not one rectangle"
        assert low <= (height * width).item() / AREA <= high, ((height * width).item() / AREA, low, high)


# --- the rule itself, batched (torchvision-gpu's form) ------------------------------------------------------

def test_erase_boxes_follow_torchvisions_rule_over_many_images():
    generator = torch.Generator().manual_seed(0)
    n, p = 20_000, 0.5
    images = torch.ones(n, 3, SIZE, SIZE)
    erase(images, erase_boxes(n, SIZE, SIZE, p, generator))
    check_erasing_statistics(images, p)
    # the same mean erased share as torchvision's own get_params over as many draws (0.17 for U(0.02, 0.33);
    # a range or an aspect ratio read wrongly moves it by 0.02 or more; 0.006 is 4.5 standard errors of the
    # difference of two means over 10,000 draws each, the share's spread being about 0.09)
    from torchvision.transforms import RandomErasing

    torch.manual_seed(0)
    reference = [h * w / AREA for _, _, h, w, _ in (RandomErasing.get_params(torch.empty(3, SIZE, SIZE), SCALE, RATIO,
                                                                             value=[0]) for _ in range(10_000))]
    boxes = erase_boxes(10_000, SIZE, SIZE, 1.0, generator)
    ours = (boxes[:, 2] * boxes[:, 3]).double() / AREA
    assert abs(ours.mean().item() - sum(reference) / len(reference)) < 0.006


def test_the_boxes_lie_inside_the_image_at_every_corner():
    boxes = erase_boxes(20_000, 24, SIZE, 1.0, torch.Generator().manual_seed(1))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 24).all() and (left + w <= SIZE).all()
    assert (h < 24).all() and (w < SIZE).all()  # torchvision's rule: strictly smaller than the image
    assert top.min() == 0 and (top + h).max() == 24 and left.min() == 0 and (left + w).max() == SIZE


# --- every loader that augments ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ERASING_LOADERS)
def test_random_erasing_zeroes_rectangles_after_normalisation(data_dir, kind):
    """The fraction of images erased, the zeros after normalisation, one rectangle each of a share in range:
    20 epochs of the 48 generated images (960) at p = 0.5. Without erasing no image has such a region."""
    out = loader(kind, data_dir, random_erase=0.5)
    images = []
    for epoch in range(20):
        out.set_epoch(epoch)
        images += [x for x, _ in out]
    check_erasing_statistics(torch.cat(images), 0.5)
    plain = torch.cat([x for x, _ in loader(kind, data_dir)])
    assert not erased_regions(plain).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dali_erasing_in_either_dtype(data_dir, dtype):
    images, _ = next(iter(loader("dali-cpu", data_dir, random_erase=1.0, dtype=dtype)))
    assert images.dtype == dtype and images.is_contiguous(memory_format=torch.channels_last)
    assert erased_regions(images).flatten(1).any(1).all()  # p = 1: every image (a try fits with p > 0.99)


def test_dali_erasing_resumes_exactly(data_dir):
    """Its draws come from DALI's random operators, which the pipeline's checkpoint carries."""
    first = loader("dali-cpu", data_dir, random_erase=0.5)
    batches = iter(first)
    next(batches)
    state = first.state_dict()
    rest = [x.clone() for x, _ in batches]
    resumed = loader("dali-cpu", data_dir, random_erase=0.5)
    resumed.load_state_dict(state)
    again = [x.clone() for x, _ in resumed]
    assert len(again) == len(rest) and all(torch.equal(a, b) for a, b in zip(again, rest))


@pytest.mark.parametrize("kind", ["dali-cpu", "torchvision"])
def test_trivial_augment_changes_the_batches(one_image_data, kind):
    """The same seeds with and without TrivialAugment: only it can make the two differ (colour jitter off)."""
    def first_batch(**kw):
        torch.manual_seed(0)  # the torchvision loader's transforms draw from torch's generator (workers=0)
        return next(iter(loader(kind, one_image_data, color_jitter=0.0, **kw)))[0]

    plain, again, augmented = first_batch(), first_batch(), first_batch(trivial_augment=True)
    assert torch.equal(plain, again)  # the comparison is fair: the same seed gives the same batch
    assert augmented.shape == plain.shape and augmented.dtype == plain.dtype
    assert not torch.equal(augmented, plain)


def test_trivial_augment_keeps_dalis_deprecation_warnings_quiet(one_image_data):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(iter(loader("dali-cpu", one_image_data, trivial_augment=True)))
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert not [m for m in messages if "nvidia.dali.fn.experimental" in m], messages


def test_trivial_augment_on_torchvision_gpu_is_refused_in_one_line(data_dir):
    with pytest.raises(UserError) as error:
        loader("torchvision-gpu", data_dir, trivial_augment=True)
    message = str(error.value)
    assert "\n" not in message and "--trivial-augment" in message and "dali-cpu" in message
    assert len(loader("torchvision-gpu", data_dir, random_erase=0.1)) > 0  # random erasing runs there
