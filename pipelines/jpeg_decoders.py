"""Image bytes to pixels for the torchvision loaders: uint8 CHW RGB, upright, as pipelines.images.to_rgb shows them.

JPEGs decode by libjpeg-turbo through TorchCodec (`torchcodec.decoders.decode_jpeg`: the CPU, or nvJPEG on CUDA)
where it is installed, else through `torchvision.io.decode_jpeg`, which torchvision 0.29 deprecates in TorchCodec's
favour; every other format (PNG, BMP, TIFF, WebP, also behind a .JPEG name) through PIL. Measured on photo-like
JPEGs (tests/component/test_jpeg_decoders.py): both give PIL's pixels exactly (4:2:0, 4:4:4, progressive, greyscale,
CMYK, EXIF-rotated) for 0.44 ms per 400x350 photo where PIL and to_rgb take 0.50.

`RN50_JPEG_DECODER` (torchcodec, torchvision or PIL) picks one, so the benchmark harness can measure each; unset,
the first of them installed. The loaders' `decode` description names the one that ran.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import warnings

import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from pipelines.errors import UserError
from pipelines.images import to_rgb

ENV = "RN50_JPEG_DECODER"
DECODERS = ("torchcodec", "torchvision", "PIL")  # the order of preference
JPEG_MAGIC = b"\xff\xd8"
ORIENTATION = 0x0112  # the EXIF tag

# torchvision 0.29.1 warns once per call of any of its decoders: a DeprecationWarning from torchvision/io/image.py
# with this message (seen by running it). One warning per image that no user of ours can act on: filtered out,
# this message only, and only while our calls run (_quiet_torchvision).
_TORCHVISION_DEPRECATION = re.compile(r"The image decoding and encoding capabilities of TorchVision are deprecated")


def installed(name: str) -> bool:
    """Whether decoder `name` can run here (an import that fails, for a missing library too, is not installed)."""
    try:
        if name == "torchcodec":
            from torchcodec.decoders import decode_jpeg  # noqa: F401
        elif name == "torchvision":
            from torchvision.io import decode_jpeg  # noqa: F401  (a later torchvision drops it)
    except Exception:  # ImportError, or a native library that does not load (OSError, RuntimeError)
        return False
    return True


def jpeg_decoder(batched: bool = False, environ=os.environ) -> str:
    """The JPEG decoder the loaders use: RN50_JPEG_DECODER's, else the first of DECODERS installed. batched:
    for the torchvision-gpu loader, which decodes a batch in one call (TorchCodec or torchvision, never PIL)."""
    allowed = DECODERS[:2] if batched else DECODERS
    asked = environ.get(ENV, "")
    if asked and asked not in allowed:
        raise UserError(f"{ENV}={asked!r} is not a JPEG decoder{' of this loader' if batched else ''}; set it to "
                        f"{' or '.join(allowed)}, or unset it for the first installed")
    if asked and not installed(asked):
        raise UserError(f"{ENV}={asked}: {asked} is not installed here (pip install {asked}), or unset {ENV}")
    if asked:
        return asked
    found = next((name for name in allowed if installed(name)), None)
    if found is None:
        import torchvision

        raise UserError(f"no batched JPEG decoder: torchvision {torchvision.__version__} has no torchvision.io."
                        "decode_jpeg (its decoders moved to TorchCodec); pip install torchcodec for --loader "
                        "torchvision-gpu, or choose --loader dali or torchvision")
    return found


def describe(decoder: str) -> str:
    """The decoder in a loader's `decode` description: "TorchCodec's decode_jpeg (libjpeg-turbo)"."""
    return {"torchcodec": "TorchCodec's decode_jpeg (libjpeg-turbo)",
            "torchvision": "torchvision.io.decode_jpeg (libjpeg-turbo)", "PIL": "PIL"}[decoder]


def read_pixels(raw: bytes, decoder: str, keep_pil: bool = False):
    """An image file's bytes as uint8 CHW RGB pixels, upright; a PIL image (8-bit RGB, upright) instead where
    PIL decodes it and `keep_pil` (its resize then runs in PIL: pillow-simd's, pipelines.torchvision_loader)."""
    if raw[:2] != JPEG_MAGIC or decoder == "PIL":
        with Image.open(io.BytesIO(raw)) as image:
            image = to_rgb(image)
        return image if keep_pil else pil_to_tensor(image)
    return decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), decoder)


def decode_jpeg(data: torch.Tensor, decoder: str) -> torch.Tensor:
    """One JPEG (its bytes as a CPU uint8 tensor) as uint8 CHW RGB on the CPU, the EXIF orientation applied:
    TorchCodec applies it always (measured, tags 1-8), torchvision when asked."""
    if decoder == "torchcodec":
        from torchcodec.decoders import decode_jpeg as torchcodec_jpeg

        return torchcodec_jpeg(data, mode="RGB")
    from torchvision.io import ImageReadMode, decode_jpeg as torchvision_jpeg

    with _quiet_torchvision():
        return torchvision_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)


def decode_jpegs(datas: list[torch.Tensor], decoder: str, device: torch.device) -> list[torch.Tensor]:
    """JPEGs (CPU uint8 tensors of their bytes) decoded on a CUDA device in one batched nvJPEG call, as uint8 CHW
    RGB there. The EXIF orientation is not applied: torchvision's batch ignores it, so the loader decodes tagged
    JPEGs on the CPU instead (exif_orientation)."""
    if decoder == "torchcodec":
        from torchcodec.decoders import decode_jpeg as torchcodec_jpeg

        return torchcodec_jpeg(list(datas), mode="RGB", device=device)
    from torchvision.io import ImageReadMode, decode_jpeg as torchvision_jpeg

    with _quiet_torchvision():
        return torchvision_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)


def exif_orientation(raw: bytes) -> int:
    """A JPEG's EXIF orientation tag (1-8; 1 without one), read from its header by PIL (no decode)."""
    with Image.open(io.BytesIO(raw)) as image:
        tag = image.getexif().get(ORIENTATION, 1)
    return tag if tag in range(1, 9) else 1


# --- torchvision's deprecation warning, filtered while our calls run -----------------------------------------
# warnings.catch_warnings saves and restores all of the process's filters: not safe where several threads decode at
# once (the torchvision-gpu loader's readers), and it would undo a filter another thread set meanwhile. So the first
# caller in puts one filter in front of all others (this message, from torchvision's module, ignored: also under
# `-W error` and a test's `simplefilter("always")`) and the last one out takes that one out again. Python searches
# the filters anew for each warning, and an ignored one leaves no trace in a module's warning registry.

_lock = threading.Lock()
_callers = 0
_filter = None  # the entry in warnings.filters while callers are in


@contextlib.contextmanager
def _quiet_torchvision():
    global _callers, _filter
    with _lock:
        if _callers == 0:
            warnings.filterwarnings("ignore", message=_TORCHVISION_DEPRECATION.pattern, category=DeprecationWarning,
                                    module=r"torchvision\.io\.")
            _filter = warnings.filters[0]
        _callers += 1
    try:
        yield
    finally:
        with _lock:
            _callers -= 1
            if _callers == 0 and _filter in warnings.filters:  # a test's catch_warnings may have taken it out
                warnings.filters.remove(_filter)
