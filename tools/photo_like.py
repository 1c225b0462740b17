"""Photo-like images for decode-cost work: `tools.make_dataset --photo-like` renders these.

Why not the default mode's images: JPEG decoding costs what the file's coefficients cost (entropy decoding is
most of it), so a speed figure means something only on content whose statistics are a photograph's. A photo
has detail at every scale (its power spectrum falls as about 1/f^2), objects with edges that occlude one
another, smooth regions (sky, walls) beside busy ones (foliage, fabric), smooth illumination, and sensor
grain; its colour varies more slowly than its brightness. Each image here is built from those parts, all
vectorised (numpy FFTs, PIL's drawing and filters), tens of milliseconds an image:

- a "dead leaves" layer of occluding shapes (ellipses, polygons, rectangles) whose sizes follow a power law,
  each with its own colour (near the class's hue, so classes stay apart), texture strength and grain;
- 1/f^alpha noise fields in an opponent colour space: luminance with alpha 2, chroma smoother (alpha 2.6);
- a fine, rougher texture (alpha 1.2) that only some shapes carry (foliage, fabric);
- a smooth illumination gradient, a slight optical blur, then sensor grain (luminance and a little chroma).

Sizes are ImageNet's (mostly Flickr's 500 px long side at 4:3 or 3:2, some portraits, square and wider
pictures, the shorter side kept in [min_side, max_side]); the JPEG quality 85-95 with 4:2:0 chroma is drawn
per image by make_dataset. docs/benchmarks.md (The loader shootout: CPU time per image) gives the bytes per pixel and the decode
time measured against real photos.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (width / height of a landscape picture, weight): ImageNet is mostly 4:3 and 3:2 camera frames
ASPECTS = ((4 / 3, 0.50), (3 / 2, 0.25), (5 / 4, 0.08), (1.0, 0.07), (16 / 9, 0.06), (2.0, 0.04))
LONG_SIDE = 500  # Flickr's "medium" size, most of ImageNet's long sides
PORTRAIT = 0.25  # share of pictures taller than wide
# Grain and texture strengths (0..255 scale), tuned so the files' bytes per pixel and libjpeg-turbo's decode
# time match real photos at ImageNet's size (docs/benchmarks.md says what was measured).
GRAIN_LUMA = (5.0, 9.0)  # sensor grain sigma, drawn per image
GRAIN_CHROMA = 0.35  # chroma grain relative to luma grain
TEXTURE = 30.0  # amplitude of the 1/f luminance field
FINE_TEXTURE = 60.0  # amplitude of the rough texture, on the shapes that carry it
ROUGH_SHARE = 0.6  # share of shapes with the rough texture
BLUR = (0.3, 0.6)  # optical blur radius, px, drawn per image


def photo_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(width, height): an ImageNet-like frame, its shorter side within [min_side, max_side]."""
    ratios, weights = zip(*ASPECTS)
    ratio = ratios[int(rng.choice(len(ratios), p=np.array(weights) / sum(weights)))]
    long = LONG_SIDE if rng.random() < 0.7 else int(rng.integers(400, 641))
    short = int(np.clip(round(long / ratio), min_side, max_side))
    long = max(short, int(round(short * ratio)))
    return (short, long) if rng.random() < PORTRAIT else (long, short)


def power_law_noise(rng: np.random.Generator, h: int, w: int, alpha: float, channels: int = 1) -> np.ndarray:
    """float32 [channels, h, w], each with unit variance and a power spectrum falling as 1/f^alpha."""
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amplitude = f ** (-alpha / 2)
    amplitude[0, 0] = 0.0  # no DC: mean 0
    white = rng.standard_normal((channels, h, w), dtype=np.float32)
    field = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=(h, w)).astype(np.float32)
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-6
    return field


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[N, 3] RGB in 0..1 from hue, saturation and value arrays in 0..1 (a few colours, not pixels)."""
    h6 = (h % 1.0) * 6.0
    sector, f = np.floor(h6).astype(int) % 6, h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table[sector, np.arange(len(h))]


def leaves(rng: np.random.Generator, w: int, h: int, count: int) -> np.ndarray:
    """int32 [h, w]: which of `count` occluding shapes (1..count; 0 the background) is in front at each pixel.
    Sizes follow a power law (few large, many small), as objects do across a photo's scales."""
    canvas = Image.new("I", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    short = min(w, h)
    radii = short * 0.5 * (0.02 / 0.5) ** rng.random(count)  # log-uniform: 1% .. 50% of the shorter side
    for index, r in enumerate(np.sort(radii)[::-1], start=1):  # large first: small ones land in front
        cx, cy = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(-0.1 * h, 1.1 * h)
        kind = rng.integers(3)
        if kind == 0:
            rx, ry = r, r * rng.uniform(0.3, 1.0)
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=index)
        elif kind == 1:
            corners = int(rng.integers(3, 8))
            angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
            reach = r * rng.uniform(0.5, 1.0, corners)
            draw.polygon(list(zip(cx + reach * np.cos(angles), cy + reach * np.sin(angles))), fill=index)
        else:
            rx, ry = r * rng.uniform(0.3, 1.0, 2)
            draw.rectangle((cx - rx, cy - ry, cx + rx, cy + ry), fill=index)
    return np.asarray(canvas, dtype=np.int32)


def render_photo(rng: np.random.Generator, cls: int, classes: int, w: int, h: int) -> Image.Image:
    """One photo-like RGB image of class `cls` (its shapes' colours lean to the class's hue)."""
    count = int(rng.integers(40, 160))
    shapes = leaves(rng, w, h, count)
    # one row per shape (row 0: the background): colour, texture strength, whether it carries rough texture
    hue = cls / classes + rng.normal(0.0, 0.08, count + 1)
    rgb = hsv_to_rgb(hue, rng.uniform(0.1, 0.8, count + 1), rng.uniform(0.15, 0.9, count + 1)) * 255.0
    texture = rng.uniform(0.2, 1.3, count + 1).astype(np.float32)
    rough = (rng.random(count + 1) < ROUGH_SHARE).astype(np.float32) * rng.uniform(0.5, 1.5, count + 1).astype(np.float32)

    luma = power_law_noise(rng, h, w, 2.0)[0]
    chroma = power_law_noise(rng, h, w, 2.6, channels=2)
    fine = power_law_noise(rng, h, w, 1.2)[0]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gx, gy = rng.uniform(-40.0, 40.0, 2) / np.float32(max(w, h))
    light = gx * (xx - w / 2) + gy * (yy - h / 2)  # illumination falling across the frame

    y = TEXTURE * texture[shapes] * luma + FINE_TEXTURE * rough[shapes] * fine + light
    cb, cr = 6.0 * chroma[0], 6.0 * chroma[1]
    image = rgb.astype(np.float32)[shapes]  # [h, w, 3]
    # opponent (luma, blue-yellow, red-green) offsets back to RGB
    image[..., 0] += y + 1.4 * cr
    image[..., 1] += y - 0.34 * cb - 0.71 * cr
    image[..., 2] += y + 1.77 * cb
    picture = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")
    picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR)))  # lens and demosaicking blur

    sigma = rng.uniform(*GRAIN_LUMA)
    grain = rng.standard_normal((h, w, 1), dtype=np.float32) * sigma
    grain = grain + rng.standard_normal((h, w, 3), dtype=np.float32) * (sigma * GRAIN_CHROMA)
    pixels = np.asarray(picture, dtype=np.float32) + grain
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
