"""The CPU pipeline's resize and colour jitter, inside DALI (`fn.python_function`) but done by torch and Pillow.

Why: on the CPU, DALI's own resampler and colour operators cost more than decoding the crop. Profiled on one
2-core machine (photo-like JPEGs, crop to 224, per image): the fused ROI decode 0.67 ms, DALI's antialiased
linear resize 0.63 ms (torch's uint8 antialiased bilinear, AVX2: 0.10 ms), fn.color_twist 0.95 ms (most of it
rounding floats back to uint8; Pillow's matrix conversion does the same job in 0.12 ms). docs/loaders.md has the
whole table. The GPU and hybrid pipelines keep DALI's operators: on a GPU they cost next to nothing.

Both steps keep their meaning:
- resize: torchvision's RandomResizedCrop resizes with torch's antialiased bilinear interpolation, the function
  used here; DALI's triangular-filter resize differs from it by rounding (tests/component/test_dali_host.py).
- jitter: today's fn.color_twist is one affine map per image, brightness b, contrast c around the mid-grey 128
  and saturation s: out = b*c*S(s) x + b*128*(1-c), clamped to 0..255 and rounded. S(s) = s*I + (1-s)*luma
  weights is torchvision's saturation (a blend with the greyscale image); DALI's YIQ form of it differs by
  5e-4 in its coefficients. The factors are DALI's own random draws (checkpointed: exact resume holds).

The batch functions run on DALI's executor thread, one call per batch, torch on that thread alone (the loader's
CPU parallelism is DALI's decoding threads); torch and Pillow release the GIL inside. The loader's constructor
fixes the calling thread's own torch thread count first (torch takes a thread's count at its first op).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

from pipelines.settings import one_torch_thread

# DALI hands python_function its inputs as read-only arrays; torch.from_numpy warns that writing to them would be
# undefined. Nothing here writes to an input, so the warning (once per process, in users' logs) says nothing.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__)

LUMA = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601), so its saturation's
MID_GREY = 128.0  # the centre fn.color_twist's contrast scales around


def resize(image: np.ndarray, size: int, mirror: bool = False) -> np.ndarray:
    """One HWC uint8 image to size x size, torch's antialiased bilinear (torchvision's RandomResizedCrop's),
    flipped left to right where `mirror`.

    Through the op's `out=` form into an HWC buffer: F.interpolate returns NCHW, and its copy back to HWC took as
    long as the resize (its uint8 kernel writes channels-last output directly: 0.10 ms per image against 0.22)."""
    pixels = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)  # NCHW view of HWC: channels_last, no copy
    out = torch.empty((size, size, 3), dtype=torch.uint8)
    torch.ops.aten._upsample_bilinear2d_aa.out(pixels, [size, size], False, None, None,
                                               out=out.permute(2, 0, 1).unsqueeze(0))
    return (torch.flip(out, [1]) if mirror else out).numpy()  # numpy's reversed copy of 3-byte pixels: 15x slower


def jitter_matrix(brightness: float, contrast: float, saturation: float) -> tuple[float, ...]:
    """The colour jitter as Pillow's 12-number RGB matrix (3 rows of 3 weights and an offset)."""
    luma = np.array(LUMA)
    mix = saturation * np.eye(3) + (1.0 - saturation) * np.tile(luma, (3, 1))
    weights = brightness * contrast * mix
    offset = brightness * MID_GREY * (1.0 - contrast)
    return tuple(float(v) for row in weights for v in (*row, offset))


def jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """One HWC uint8 image through jitter_matrix, clamped and rounded to uint8 (as fn.color_twist's output)."""
    height, width = image.shape[:2]
    frame = Image.frombuffer("RGB", (width, height), np.ascontiguousarray(image), "raw", "RGB", 0, 1)
    return np.asarray(frame.convert("RGB", jitter_matrix(brightness, contrast, saturation)))


class Normalize:
    """uint8 HWC images to `dtype` (float16 or float32: the loaders' batch dtypes), (x / 255 - mean) / std.

    One multiply-add per image, over rows of pixels: scale and shift repeated along a row (W x 3 numbers) keep the
    inner loop contiguous and vectorised, where a broadcast over the 3 channels ran 3x slower; image by image, so
    the float32 temporary stays in the cache (the whole batch at once ran 15x slower). 0.04 ms per 224 px image,
    where DALI's CPU crop_mirror_normalize took 0.24-0.36 ms (docs/loaders.md)."""

    def __init__(self, normalize: tuple[float, ...], dtype: torch.dtype):
        mean, std = np.array(normalize[:3]), np.array(normalize[3:])
        self.scale, self.shift = torch.from_numpy(1 / (255 * std)).float(), torch.from_numpy(-mean / std).float()
        self.dtype = dtype
        self._rows = {}  # width -> (shift, scale) repeated along a row: one pair per batch's width, not per image

    def __call__(self, image: np.ndarray, into: torch.Tensor) -> None:
        height, width, channels = image.shape
        if width not in self._rows:
            self._rows[width] = self.shift.repeat(width), self.scale.repeat(width)
        shift, scale = self._rows[width]
        rows = torch.from_numpy(image).view(height, width * channels).float()
        torch.addcmul(shift, rows, scale, out=into.view(height, -1))


def resize_batch(images, mirror, *, size: int) -> list[np.ndarray]:
    """Each image of the batch resized, and flipped where its coin (DALI's per-sample draw) says so."""
    one_torch_thread()  # DALI's thread: one small image at a time, no OpenMP team (one_torch_thread says why)
    return [resize(image, size, bool(flip)) for image, flip in zip(images, mirror)]


def normalize_batch(images, *jitter_factors, normalize: tuple[float, ...], dtype: torch.dtype) -> list[np.ndarray]:
    """Each uint8 HWC image normalised to `dtype` (Normalize), colour-jittered first where the pipeline passes the
    factors (three per-sample inputs: brightness, contrast, saturation)."""
    return _finish(images, [False] * len(images), jitter_factors, 0, Normalize(normalize, dtype))


def resize_normalize_batch(images, mirror, *jitter_factors, size: int, normalize: tuple[float, ...],
                           dtype: torch.dtype) -> list[np.ndarray]:
    """normalize_batch after the resize to `size` and the flip where `mirror` says (resize): the training
    pipeline's whole host part, each image's steps back to back. A DALI step per job cost a third more (DALI
    copies every step's output)."""
    return _finish(images, mirror, jitter_factors, size, Normalize(normalize, dtype))


def _finish(images, mirror, jitter_factors, size: int, to_dtype: Normalize) -> list[np.ndarray]:
    one_torch_thread()  # DALI's thread: one small image at a time, no OpenMP team (one_torch_thread says why)
    shapes = {(size, size, 3)} if size else {image.shape for image in images}
    if len(shapes) == 1:  # one block for the batch, handed out as per-image views: one allocation, not N
        out = torch.empty((len(images), *shapes.pop()), dtype=to_dtype.dtype)
    else:
        out = [torch.empty(image.shape, dtype=to_dtype.dtype) for image in images]
    for i, (image, flip, *factors) in enumerate(zip(images, mirror, *jitter_factors)):
        if size:
            image = resize(image, size, bool(flip))
        if factors:
            image = jitter(image, *(float(f) for f in factors))
        to_dtype(image, out[i])
    return [into.numpy() for into in out]
