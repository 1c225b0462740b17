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
    flipped left to right where `mirror`: HostSteps' resize, on its own."""
    out = torch.empty((size, size, 3), dtype=torch.uint8)
    return _resize_into(torch.from_numpy(image), out, torch.empty_like(out) if mirror else None).numpy()


def _resize_into(pixels: torch.Tensor, out: torch.Tensor, flip_via: torch.Tensor | None) -> torch.Tensor:
    """`pixels` (HWC uint8) resized into `out` (size x size x 3); flipped where given `flip_via`, a buffer like
    `out` the resize then writes into (the flip cannot run in place). Returns the tensor that holds the result.

    Through the op's `out=` form into an HWC buffer: F.interpolate returns NCHW, and its copy back to HWC took as
    long as the resize (its uint8 kernel writes channels-last output directly: 0.10 ms per image against 0.22)."""
    size = out.shape[0]
    into = flip_via if flip_via is not None else out
    torch.ops.aten._upsample_bilinear2d_aa.out(pixels.permute(2, 0, 1).unsqueeze(0), [size, size], False, None,
                                               None, out=into.permute(2, 0, 1).unsqueeze(0))
    if flip_via is not None:  # torch's flip: numpy's reversed copy of 3-byte pixels took 15x as long
        torch.ops.aten.flip.out(flip_via, [1], out=out)
    return out


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
        self._rows = {}  # width -> (shift, scale) repeated along a row: built once per width, not per image

    def __call__(self, pixels: torch.Tensor, into: torch.Tensor) -> None:
        height, width, channels = pixels.shape
        if width not in self._rows:
            self._rows[width] = self.shift.repeat(width), self.scale.repeat(width)
        shift, scale = self._rows[width]
        torch.addcmul(shift, pixels.view(height, width * channels), scale, out=into.view(height, -1))


class HostSteps:
    """The CPU pipeline's host work on a batch, one DALI python_function (batch_processing) called with the
    images, then each image's flip coin where it resizes (`size`), then the jitter's three per-sample factors
    (brightness, contrast, saturation) where the pipeline jitters. Per image, back to back: the resize to `size`
    and the flip, the colour jitter, the normalisation to `dtype` (`normalize` None: the uint8 images out).
    A DALI step per job cost a third more (DALI copies every step's output).

    One object per graph, its buffers reused from batch to batch: DALI copies a python step's outputs into its own
    buffers before it calls the step again (tests/component/test_dali_host.py holds a batch across later ones), and
    a fresh 19 MB output block per batch cost its page faults. The images out are views of one block where they
    share a shape: one allocation, not N."""

    def __init__(self, *, size: int = 0, normalize: tuple[float, ...] | None = None,
                 dtype: torch.dtype = torch.uint8):
        self.size = size
        self.to_dtype = Normalize(normalize, dtype) if normalize is not None else None
        self.dtype = dtype if normalize is not None else torch.uint8
        self._block = torch.empty(0, dtype=self.dtype)
        self._work = torch.empty((2, size, size, 3), dtype=torch.uint8)  # resize, then flip, targets

    def __call__(self, images, *inputs) -> list[np.ndarray]:
        one_torch_thread()  # DALI's thread: one small image at a time, no OpenMP team (one_torch_thread says why)
        mirror, factors = (inputs[0], inputs[1:]) if self.size else ([False] * len(images), inputs)
        out = self._outputs(images)
        resized, flip_via = self._work
        for image, into, flip, *jitter_factors in zip(images, out, mirror, *factors):
            pixels = torch.from_numpy(image)
            if self.size:  # into `into` itself where nothing follows (uint8 out, no jitter)
                last = self.to_dtype is None and not jitter_factors
                pixels = _resize_into(pixels, into if last else resized, flip_via if flip else None)
            if jitter_factors:
                pixels = torch.from_numpy(jitter(pixels.numpy(), *(float(f) for f in jitter_factors)))
            if self.to_dtype is not None:
                self.to_dtype(pixels, into)
            elif pixels.data_ptr() != into.data_ptr():
                into.copy_(pixels)
        return list(out.numpy()) if isinstance(out, torch.Tensor) else [into.numpy() for into in out]

    def _outputs(self, images):
        """The batch's output: views of the reused block where every image has one shape, else one per image."""
        shapes = {(self.size, self.size, 3)} if self.size else {image.shape for image in images}
        if len(shapes) > 1:
            return [torch.empty(image.shape, dtype=self.dtype) for image in images]
        shape = (len(images), *shapes.pop())
        if self._block.shape != shape:
            self._block = torch.empty(shape, dtype=self.dtype)
        return self._block
