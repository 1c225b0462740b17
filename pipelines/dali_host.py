"""The CPU pipeline's resize and colour jitter, inside DALI (`fn.python_function`) but done by torch and Pillow.

Why: on the CPU, DALI's own resampler and colour operators cost more than decoding the crop. Profiled on one
2-core machine (photo-like JPEGs, crop to 224, per image): the fused ROI decode 0.67 ms, DALI's antialiased
linear resize 0.63 ms (torch's uint8 antialiased bilinear, AVX2: 0.18 ms), fn.color_twist 0.95 ms (most of it
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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.settings import one_torch_thread

LUMA = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601), so its saturation's
MID_GREY = 128.0  # the centre fn.color_twist's contrast scales around


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """One HWC uint8 image to size x size, torch's antialiased bilinear (torchvision's RandomResizedCrop's)."""
    pixels = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)  # NCHW view of HWC: channels_last, no copy
    out = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).contiguous().numpy()


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


def resize_batch(images, *, size: int) -> list[np.ndarray]:
    one_torch_thread()  # DALI's thread: one small image at a time, no OpenMP team (one_torch_thread says why)
    return [resize(image, size) for image in images]


def jitter_batch(images, brightness, contrast, saturation) -> list[np.ndarray]:
    """Each image of the batch jittered with its own three factors (DALI's per-sample draws)."""
    return [jitter(image, float(b), float(c), float(s))
            for image, b, c, s in zip(images, brightness, contrast, saturation)]
