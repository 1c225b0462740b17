"""Image helpers the loaders share: PIL images as the DALI decoders give them."""

from __future__ import annotations

from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as DALI's decoder gives it: EXIF orientation applied (a photo tagged 3, 6 or 8 comes upright,
    as DALI's decoders and torchvision's decode_jpeg(apply_exif_orientation=True) show it), grayscale and
    palette expanded, alpha dropped (not blended), CMYK converted, and 16/32-bit grayscale ("I;16", "I")
    scaled to 8 bit (PIL's convert would clip it to 255). A 16-bit RGB PNG already opens as 8-bit RGB."""
    image = ImageOps.exif_transpose(image)  # the same image when it has no orientation tag (or tag 1)
    if image.mode.startswith("I;16") or image.mode == "I":
        import numpy as np

        wide = np.asarray(image, dtype=np.float64)  # 16-bit values, also when PIL holds them as "I"
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        raise ValueError(f"{image.filename}: floating-point images are not read; convert them to 8 or 16 bit")
    return image.convert("RGB")
