"""Random erasing with torchvision's RandomErasing rule, in the two forms our own loaders need: a DALI graph (the
DALI loaders) and batched torch (torchvision-gpu). The torchvision loader uses torchvision's v2.RandomErasing itself.

The rule (torchvision.transforms.RandomErasing.get_params, value 0, after normalisation), per image of H x W:
with probability p, up to 10 tries of an area S = H * W * U(0.02, 0.33) and an aspect ratio r = exp(U(log 0.3,
log 3.3)); h = round(sqrt(S * r)), w = round(sqrt(S / r)); the first try with h < H and w < W is erased at a
uniform corner (top in 0..H - h, left in 0..W - w); when none fits, the image stays as it is.

Why the DALI loaders erase inside the pipeline (fn.erase) and not on the torch batch: the region's random draws
then come from DALI's own random operators, which the pipeline's checkpoint carries, so a resumed run erases
exactly what the uninterrupted one would have (every DALI loader resumes bit for bit); and on the GPU the
region never leaves the device. The ten tries cost ten scalar draws per image, unrolled at build time.
"""

from __future__ import annotations

import math

import torch

try:
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
except ImportError:  # only the DALI form needs it; pipelines.dali reports a missing DALI
    fn = None

SCALE = (0.02, 0.33)  # torchvision's defaults: the erased share of the image area
RATIO = (0.3, 3.3)  # and the erased rectangle's aspect ratio (height / width), drawn log-uniform
TRIES = 10


def erase_boxes(n: int, height: int, width: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """[n, 4] int64 (top, left, h, w) for n images of height x width by the rule above, on the CPU; h = w = 0 for an
    image left as it is."""
    area = height * width
    share = torch.empty(n, TRIES, dtype=torch.float64).uniform_(*SCALE, generator=generator)
    log_ratio = torch.empty(n, TRIES, dtype=torch.float64).uniform_(math.log(RATIO[0]), math.log(RATIO[1]),
                                                                    generator=generator)
    h = torch.round(torch.sqrt(area * share * torch.exp(log_ratio)))
    w = torch.round(torch.sqrt(area * share / torch.exp(log_ratio)))
    fits = (h < height) & (w < width)
    first = fits.to(torch.int8).argmax(1, keepdim=True)  # the first try that fits
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    erased = (torch.rand(n, generator=generator, dtype=torch.float64) < p) & fits.any(1)
    top = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (width - w + 1))
    return (torch.stack([top, left, h, w], 1) * erased[:, None]).long()


def erase(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """images [N, C, H, W] with each image's box (erase_boxes) set to 0, in place, as whole-batch ops on the images'
    device (the boxes go there in one small copy)."""
    top, left, h, w = (v[:, None, None, None] for v in boxes.to(images.device, non_blocking=True).unbind(1))
    rows = torch.arange(images.shape[2], device=images.device)[None, None, :, None]
    cols = torch.arange(images.shape[3], device=images.device)[None, None, None, :]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return images.masked_fill_(inside, 0)


def dali_erase(images, p: float, size: int):
    """The rule above as a DALI graph on the normalised HWC images of one training size (size x size): fn.erase
    with each sample's region, drawn by DALI's random operators (per sample; on the CPU, as arguments)."""
    fits_before = None  # 1 once an earlier try fitted: the first one that fits is used
    height = width = None
    for _ in range(TRIES):  # unrolled: ten scalar draws per sample
        share = fn.random.uniform(range=list(SCALE))
        ratio = dmath.exp(fn.random.uniform(range=[math.log(RATIO[0]), math.log(RATIO[1])]))
        area = share * float(size * size)
        h, w = _round(dmath.sqrt(area * ratio)), _round(dmath.sqrt(area / ratio))
        fits = (h < size) & (w < size)
        take = fits if fits_before is None else fits & (fits_before == 0)
        height = h * take if height is None else height + h * take
        width = w * take if width is None else width + w * take
        fits_before = fits if fits_before is None else fits_before | fits
    erased = fn.random.coin_flip(probability=p) * fits_before  # 0: the sample stays as it is
    height, width = height * erased, width * erased
    top = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (size - height + 1))
    left = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (size - width + 1))
    as_float = lambda node: fn.cast(node, dtype=types.FLOAT)  # noqa: E731
    return fn.erase(images, anchor=fn.stack(as_float(top), as_float(left)),
                    shape=fn.stack(as_float(height), as_float(width)), axis_names="HW", fill_value=0.0)


def _round(x):
    """Python's round() for the rule's sizes: a draw that lands exactly on k + 0.5 has probability zero, so
    rounding half up is rounding half to even here."""
    return dmath.floor(x + 0.5)
