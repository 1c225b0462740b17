"""The CPU pipeline's resize, flip, colour jitter and normalisation, inside DALI (`fn.python_function`), by torch.

Why: on the CPU, DALI's own resampler and colour operators cost more than decoding the crop. Profiled on one
2-core machine (photo-like JPEGs, crop to 224, per image): the fused ROI decode 0.67 ms, DALI's antialiased
linear resize 0.63 ms (torch's uint8 antialiased bilinear, AVX2: 0.10 ms), fn.color_twist 0.95 ms (most of it
rounding floats back to uint8; torch's jitter here 0.10 ms), crop_mirror_normalize 0.24-0.36 ms (torch's 0.04).
docs/loaders.md has the whole table. The GPU and hybrid pipelines keep DALI's operators: on a GPU they cost next
to nothing.

Both steps keep their meaning:
- resize: torchvision's RandomResizedCrop resizes with torch's antialiased bilinear interpolation, the function
  used here; DALI's triangular-filter resize differs from it by rounding (tests/component/test_dali_host.py).
- jitter: today's fn.color_twist is one affine map per image, brightness b, contrast c around the mid-grey 128
  and saturation s: out = b*c*S(s) x + b*128*(1-c), clamped to 0..255 (and rounded there: not here, where the
  normalisation follows). S(s) = s*I + (1-s)*luma weights is torchvision's saturation (a blend with the
  greyscale image); DALI's YIQ form of it differs by 5e-4 in its coefficients. The factors are DALI's own
  random draws (checkpointed: exact resume holds).

The batch functions run on DALI's executor thread, one call per batch, torch on that thread alone (the loader's
CPU parallelism is DALI's decoding threads); torch releases the GIL inside. The loader's constructor
fixes the calling thread's own torch thread count first (torch takes a thread's count at its first op).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from pipelines.settings import one_torch_thread

# DALI hands python_function its inputs as read-only arrays; torch.from_numpy warns that writing to them would be
# undefined. Nothing here writes to an input, so the warning (once per process, in users' logs) says nothing.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__)

LUMA = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601), so its saturation's
MID_GREY = 128.0  # the centre fn.color_twist's contrast scales around
_LUMA = torch.tensor(LUMA)


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


def jitter(pixels: torch.Tensor, brightness: float, contrast: float, saturation: float,
           work: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """One HWC uint8 image through the colour jitter's affine map (the module's docstring), clamped to 0..255, as
    float32 HWC: the normalisation follows. Unrounded, where fn.color_twist rounds to whole levels (at most half a
    level apart). `work`: jitter_work's buffers for this shape, reused (fresh ones per image page-faulted: their
    600 kB lie above malloc's mmap threshold); the result is the last of them.

    Four passes over contiguous rows: the grey level of each pixel (a matrix-vector product), repeated over its 3
    channels, plus the scaled pixels, clamped. 0.10 ms per 224 px image beside the normalisation alone; Pillow's
    matrix conversion took 0.16 with its copies in and out, a 3 x 3 matrix product (torch, numpy, a 1 x 1
    convolution) 0.08-0.4, broadcasts over the 3 channels 0.1 each."""
    rgb, grey, out = work if work is not None else jitter_work(pixels.shape)
    rgb.copy_(pixels.view(-1, 3))
    scale = brightness * contrast
    torch.addmv(torch.tensor(brightness * MID_GREY * (1.0 - contrast)), rgb, _LUMA, alpha=scale * (1.0 - saturation),
                out=grey)  # b c (1 - s) luma . x + b 128 (1 - c)
    out.view(-1, 3).copy_(grey.unsqueeze(1).expand(-1, 3))  # each pixel's grey term in its 3 channels
    out.view(-1, 3).add_(rgb, alpha=scale * saturation)
    return out.clamp_(0.0, 255.0)


def jitter_work(shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """jitter's buffers for HWC images of `shape`: the pixels as float rows, the grey levels, the result."""
    height, width, channels = shape
    return (torch.empty((height * width, channels)), torch.empty(height * width),
            torch.empty((height, width, channels)))


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
    buffers before it calls the step again (tests/component/test_dali_memory.py holds a batch across later ones), and
    a fresh 19 MB output block per batch cost its page faults. The images out are views of one block where they
    share a shape: one allocation, not N."""

    def __init__(self, *, size: int = 0, normalize: tuple[float, ...] | None = None, dtype: torch.dtype | None = None):
        if (normalize is None) != (dtype is None):
            raise ValueError("HostSteps normalises to `dtype` by `normalize`: give both, or neither for uint8 out")
        self.size = size
        self.to_dtype = Normalize(normalize, dtype) if normalize is not None else None
        self.dtype = dtype if dtype is not None else torch.uint8
        self._block = torch.empty(0, dtype=self.dtype)
        self._work = torch.empty((2, size, size, 3), dtype=torch.uint8)  # resize, then flip, targets
        self._jitter_work = {}  # image shape -> jitter's buffers

    def __call__(self, images, *inputs) -> list[np.ndarray]:
        one_torch_thread()  # DALI's thread: one small image at a time, no OpenMP team (one_torch_thread says why)
        mirror, factors = (inputs[0], inputs[1:]) if self.size else ([False] * len(images), inputs)
        if factors and self.to_dtype is None:
            raise ValueError("HostSteps jitters only where it normalises: the jitter's result is float")
        out = self._outputs(images)
        resized, flip_via = self._work
        for image, into, flip, *jitter_factors in zip(images, out, mirror, *factors):
            pixels = torch.from_numpy(image)
            if self.size:  # straight into the output where nothing follows (uint8 out)
                pixels = _resize_into(pixels, into if self.to_dtype is None else resized, flip_via if flip else None)
            if jitter_factors:
                shape = tuple(pixels.shape)
                if shape not in self._jitter_work:
                    self._jitter_work[shape] = jitter_work(shape)
                pixels = jitter(pixels, *(float(f) for f in jitter_factors), work=self._jitter_work[shape])
            if self.to_dtype is not None:
                self.to_dtype(pixels, into)
            elif not self.size:
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
