"""pipelines.jpeg_decoders: JPEGs by TorchCodec where it is installed, by torchvision.io (deprecated in 0.29) as the
fallback, every other format by PIL; the same pixels as PIL and pipelines.images.to_rgb either way, and none of
torchvision's deprecation warnings in users' logs (issue 39 item 4)."""

from __future__ import annotations

import io
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import pil_to_tensor

from pipelines import build_loader, jpeg_decoders
from pipelines.errors import UserError
from pipelines.images import to_rgb
from pipelines.torchvision_gpu import read_image

HAS_TORCHCODEC = jpeg_decoders.installed("torchcodec")


def photo(mode="RGB", size=(40, 30), seed=0) -> Image.Image:
    """Smooth noise with grain: a photo's detail at a few scales (flat images hide chroma and IDCT differences)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (size[1] // 5, size[0] // 5, 3), dtype=np.uint8))
    grain = rng.integers(-10, 11, (size[1], size[0], 3))
    pixels = np.asarray(small.resize(size, Image.BICUBIC)).astype(np.int16) + grain
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode)


def jpeg(image: Image.Image, tag: int = 1, **options) -> bytes:
    exif = Image.Exif()
    if tag != 1:
        exif[jpeg_decoders.ORIENTATION] = tag
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif.tobytes(), **options)
    return out.getvalue()


# Every kind of JPEG the loaders meet: chroma 4:2:0 and 4:4:4, progressive, greyscale, CMYK, every EXIF tag
CASES = {"420": jpeg(photo()), "444": jpeg(photo(), subsampling=0), "progressive": jpeg(photo(), progressive=True),
         "grey": jpeg(photo("L")), "cmyk": jpeg(photo("CMYK")),
         **{f"tag{t}": jpeg(photo(seed=t), tag=t) for t in range(2, 9)}}


def pil_pixels(raw: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(raw)) as image:
        return pil_to_tensor(to_rgb(image))


def without_torchcodec(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # an import of it fails: as if not installed
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)


@pytest.mark.parametrize("case", CASES)
def test_the_torchvision_fallback_gives_pils_pixels_and_no_deprecation_warning(case, monkeypatch):
    without_torchcodec(monkeypatch)
    monkeypatch.delenv(jpeg_decoders.ENV, raising=False)
    decoder = jpeg_decoders.jpeg_decoder()
    assert decoder == "torchvision"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # a user's `-W default` (pytest's own filter for it is out of the way)
        pixels = jpeg_decoders.read_pixels(CASES[case], decoder)
        warnings.warn("another warning passes", DeprecationWarning)
    # libjpeg-turbo in torchvision and in PIL, the same settings (islow IDCT, fancy upsampling): measured equal
    assert torch.equal(pixels, pil_pixels(CASES[case]))
    assert [str(w.message) for w in shown] == ["another warning passes"]


def test_torchvisions_deprecation_warning_is_what_we_drop_and_only_in_our_calls():
    """If torchvision rewords its warning, the filter above matches nothing: this says so. A user's own call of
    torchvision's decoder, after ours, still warns: the filter is in place only while ours run."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpeg_decoders.read_pixels(CASES["420"], "torchvision")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        decode_jpeg(torch.frombuffer(bytearray(CASES["420"]), dtype=torch.uint8), mode=ImageReadMode.RGB)
    assert shown and all(w.category is DeprecationWarning for w in shown)
    assert all(jpeg_decoders._TORCHVISION_DEPRECATION.match(str(w.message)) for w in shown)


@pytest.mark.skipif(not HAS_TORCHCODEC, reason="torchcodec is not installed (pip install torchcodec)")
@pytest.mark.parametrize("case", CASES)
def test_torchcodec_gives_the_fallbacks_pixels(case, monkeypatch):
    monkeypatch.delenv(jpeg_decoders.ENV, raising=False)
    assert jpeg_decoders.jpeg_decoder() == "torchcodec"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        ours = jpeg_decoders.read_pixels(CASES[case], "torchcodec")
    # Measured with torchcodec 0.17.0: equal to torchvision's and PIL's on every case, the EXIF tag applied;
    # 0 levels is the tolerance (one libjpeg-turbo, the same settings)
    assert torch.equal(ours, jpeg_decoders.read_pixels(CASES[case], "torchvision"))
    assert torch.equal(ours, pil_pixels(CASES[case]))
    assert not shown


def test_other_formats_and_pil_as_the_decoder_read_as_to_rgb():
    png = io.BytesIO()
    photo("P").save(png, "PNG")  # a palette PNG: expanded to RGB by to_rgb
    assert torch.equal(jpeg_decoders.read_pixels(png.getvalue(), "torchvision"), pil_pixels(png.getvalue()))
    kept = jpeg_decoders.read_pixels(CASES["tag6"], "PIL", keep_pil=True)
    assert isinstance(kept, Image.Image) and kept.mode == "RGB" and kept.size == (30, 40)  # upright: 6 turns it
    # a JPEG that libjpeg-turbo decodes stays a tensor: only PIL's own images go to PIL's resize
    assert isinstance(jpeg_decoders.read_pixels(CASES["420"], "torchvision", keep_pil=True), torch.Tensor)


def test_tagged_jpegs_decode_on_the_cpu_where_the_batch_would_ignore_the_tag():
    raw = CASES["tag6"]
    with Image.open(io.BytesIO(raw)) as image:
        upright = pil_to_tensor(ImageOps.exif_transpose(image).convert("RGB"))
    assert torch.equal(read_image(raw, "torchvision", decode=False), upright)  # decoded, not left for the batch
    untagged = read_image(CASES["420"], "torchvision", decode=False)
    assert untagged.dim() == 1 and bytes(untagged.numpy()) == CASES["420"]  # bytes for the batched decode


def test_the_decoder_can_be_forced_and_a_wrong_choice_is_one_line(monkeypatch, data_dir):
    monkeypatch.setenv(jpeg_decoders.ENV, "torchvision")
    out = build_loader("torchvision", "val", data_dir, batch_size=4, image_size=32, workers=0)
    assert out.decode.startswith("torchvision.io.decode_jpeg (libjpeg-turbo) for JPEGs")
    gpu = build_loader("torchvision-gpu", "val", data_dir, batch_size=4, image_size=32, workers=1)
    assert gpu.decode.startswith("torchvision.io.decode_jpeg (libjpeg-turbo)")
    monkeypatch.setenv(jpeg_decoders.ENV, "PIL")
    assert build_loader("torchvision", "val", data_dir, batch_size=4, image_size=32, workers=0).decode.startswith(
        "PIL for JPEGs")
    with pytest.raises(UserError, match="RN50_JPEG_DECODER='PIL' is not a JPEG decoder of this loader; set it to "
                                        "torchcodec or torchvision"):
        build_loader("torchvision-gpu", "val", data_dir, batch_size=4, image_size=32, workers=1)
    monkeypatch.setenv(jpeg_decoders.ENV, "libjpeg")
    with pytest.raises(UserError, match="'libjpeg' is not a JPEG decoder; set it to torchcodec or torchvision or PIL"):
        build_loader("torchvision", "val", data_dir, batch_size=4, image_size=32, workers=0)
    without_torchcodec(monkeypatch)
    monkeypatch.setenv(jpeg_decoders.ENV, "torchcodec")
    with pytest.raises(UserError, match="torchcodec is not installed here"):
        build_loader("torchvision", "val", data_dir, batch_size=4, image_size=32, workers=0)
