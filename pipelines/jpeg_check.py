"""A fast header check for JPEG files: the pre-flight test a run does before it starts.

One corrupt file stops a DALI pipeline mid-epoch (docs/design.md, DALI behaviour), so training looks at every file's header
first. `header_problem(path)` opens a file, reads its first 4 KB page and its last 64 bytes, and returns
a short reason or None (about 15 us a file from the page cache, one core):

    "zero bytes"                          an empty file
    "PNG data behind a JPEG name"         (also GIF, BMP, TIFF, WebP, HEIF/AVIF, JPEG 2000; a PNG, BMP,
                                          TIFF or WebP file named .png/.bmp/.tif/.tiff/.webp is fine,
                                          save "truncated (...)" when its end or size is short)
    "not an image (text)"                 e.g. an HTML error page saved by a failed download
    "not an image (unknown format)"       anything else that does not start with a JPEG SOI marker
    "truncated (no end-of-image marker)"  the image data does not end with FF D9
    "CMYK JPEG (4 colour components)"     CMYK or YCCK (Photoshop): the frame header has 4 components
    "unusual JPEG (N colour components)"  neither 1 (grayscale) nor 3 (YCbCr/RGB)
    "corrupt JPEG header (...)"           markers that no decoder can follow
    "unreadable (...)"                    the file cannot be opened or read

`decodes_by_content(reason)` says which of these the CPU loaders still read (CMYK, and PNG/BMP/TIFF/WebP
behind another name): the pre-flight check reports those and goes on for them (pipelines.folder).

Progressive, grayscale, optimised and EXIF-carrying JPEGs are fine (None), and so is zero padding or a
trailer of up to 4 KB after the end-of-image marker (decoders stop at the marker; DALI's and PIL's
both decode such files). Rare files need a little more reading: a frame header pushed past the first
page by large EXIF/ICC segments costs one page per jump (segments are skipped, not read), and a
missing marker in the last 64 bytes costs a look at the last 4 KB. This is a header check: it does not
decode, so a file that passes may still fail to decode; `python -m tools.scan` decodes every file
fully and is the thorough check.

`find_header_problems(paths)` runs the check over many files with a thread pool (the work is I/O:
open, two small reads, close).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

PAGE = 4096  # bytes read per header window: the frame header of a plain JPEG lies in the first page
TAIL = 64  # fast path: the end-of-image marker lies in the last TAIL bytes (else the last PAGE is searched)
MAX_HEADER = 1 << 20  # stop following segments this far into the file (ICC profiles can exceed 64 KB)
MAX_SEGMENTS = 256

ZERO_BYTES = "zero bytes"
TRUNCATED = "truncated (no end-of-image marker)"
CMYK = "CMYK JPEG (4 colour components)"
NOT_AN_IMAGE = "not an image (unknown format)"
TEXT = "not an image (text)"

# Start-of-frame markers: C0-C3, C5-C7, C9-CB, CD-CF (C4 = DHT, C8 = JPG extension, CC = DAC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: no length field
_SOS, _EOI, _SOI = 0xDA, 0xD9, 0xD8

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"BM", "BMP"),
)


def foreign_format(head: bytes) -> str | None:
    """The name of a known non-JPEG image format that `head` (a file's first bytes) starts with."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF"
    return None


def _looks_like_text(head: bytes) -> bool:
    """True if `head` reads as UTF-8 text (a multi-byte character may be cut at the end)."""
    sample = head[:512]
    if b"\0" in sample:
        return False
    for cut in range(4):
        try:
            text = sample[:len(sample) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return all(c.isprintable() or c in "\r\n\t\f" for c in text)
    return False


class _Window:
    """Random access to a file's bytes through one cached PAGE-sized window."""

    def __init__(self, f, head: bytes):
        self.f, self.base, self.buf = f, 0, head

    def get(self, pos: int, n: int) -> bytes:
        if pos < self.base or pos + n > self.base + len(self.buf):
            self.f.seek(pos)
            self.buf, self.base = self.f.read(max(n, PAGE)), pos
        return self.buf[pos - self.base:pos - self.base + n]


def _parse_header(win: _Window, size: int) -> tuple[str | None, int | None]:
    """Follow the marker segments from SOI through the frame header (judged) to the first scan.

    Returns (problem, offset of the first start-of-scan marker or None if not reached).
    """
    pos, frame_seen = 2, False
    for _ in range(MAX_SEGMENTS):
        if pos >= min(size, MAX_HEADER):
            return None, None  # header runs past what we follow (or to the end: the tail test says so)
        b = win.get(pos, 2)
        if len(b) < 2:
            return None, None
        if b[0] != 0xFF:
            # libjpeg skips stray bytes before a marker with a warning; so do we.
            nxt = win.get(pos, PAGE).find(b"\xff")
            if nxt < 0:
                return "corrupt JPEG header (no marker where one must be)", None
            pos += nxt
            continue
        marker = b[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE or marker == _SOI:
            pos += 2
            continue
        if marker == _EOI:
            return "corrupt JPEG header (end-of-image before any scan)", None
        if marker == _SOS:
            return (None, pos) if frame_seen else ("corrupt JPEG header (scan before the frame header)", None)
        seg = win.get(pos + 2, 2)
        if len(seg) < 2:
            return None, None
        length = int.from_bytes(seg, "big")
        if length < 2:
            return "corrupt JPEG header (bad segment length)", None
        if marker in _SOF and not frame_seen:
            frame = win.get(pos + 4, 6)  # precision, height, width, number of components
            if len(frame) < 6:
                return None, None
            height, width, components = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big"), frame[5]
            if components == 4:
                return CMYK, None
            if components not in (1, 3):
                return f"unusual JPEG ({components} colour components)", None
            if width == 0 or height == 0:
                return "corrupt JPEG header (zero width or height)", None
            frame_seen = True
        pos += 2 + length
    return None, None


def _ends_with_eoi(f, size: int, tail: bytes, sos: int | None) -> bool:
    """True if the image data ends with an end-of-image marker (FF D9).

    Fast path: the marker lies in the last TAIL bytes, as in every file PIL, libjpeg and cameras
    normally write. Otherwise look at the last page: the marker may be followed by zero padding or by
    a short trailer, which decoders ignore. FF D9 cannot occur inside entropy-coded data (an FF there
    is always followed by 00 or a restart marker), so a marker found after the first scan's start is
    the real end of the image, not an embedded EXIF thumbnail's.
    """
    if b"\xff\xd9" in tail:
        return True
    if sos is None:
        return False
    start = max(0, size - PAGE)
    f.seek(start)
    last = f.read(PAGE).rfind(b"\xff\xd9")
    return last >= 0 and start + last > sos


# Formats other than JPEG that class folders may hold, by file name suffix. DALI's decoder (CPU) and PIL
# both read these by content: checked on DALI's CPU decoder with small generated files (RGB, grayscale,
# palette, alpha dropped, 16-bit scaled to 8 bit). GIF, HEIF/AVIF and JPEG 2000 are not among them.
OTHER_FORMATS = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WebP"}
# Which loaders' decoders read a file by its content, so that an odd but readable file trains, is their
# registry record's `decodes_by_content` (pipelines.registry): "dali-cpu" and "dali-hybrid" (DALI's CPU
# decoder) and "torchvision" (PIL). The GPU decoders ("dali": nvJPEG through the mixed decoder;
# "torchvision-gpu": torchvision's nvJPEG batch) are not among them: they have not been seen to decode CMYK
# JPEGs on a GPU, so these files stop them as before.


def decodes_by_content(reason: str | None) -> bool:
    """True if a file `header_problem` reported with `reason` is still read by the CPU loaders (same
    pixels from DALI's CPU decoder and PIL): a CMYK JPEG, or a PNG/BMP/TIFF/WebP under another name."""
    if reason == CMYK:
        return True
    name, sep, _ = (reason or "").partition(" data behind ")
    return bool(sep) and name in set(OTHER_FORMATS.values())


def _other_format_problem(f, size: int, name: str) -> str | None:
    """Truncation checks for a PNG, BMP or WebP file (their ends or sizes are cheap to test); TIFF passes."""
    if name == "PNG":
        f.seek(max(0, size - TAIL))
        return None if b"IEND" in f.read(TAIL) else "truncated (no PNG end chunk)"
    f.seek(0)
    head = f.read(12)
    if name == "BMP" and len(head) >= 6 and int.from_bytes(head[2:6], "little") > size:
        return "truncated (BMP shorter than its header says)"
    if name == "WebP" and len(head) >= 8 and int.from_bytes(head[4:8], "little") + 8 > size:
        return "truncated (WebP shorter than its header says)"
    return None


def header_problem(path) -> str | None:
    """A short reason why `path` is not a JPEG that decoders will take, or None if its header is fine.

    Reads the first 4 KB and the last 64 bytes (plus one 4 KB page per jump past a segment that
    reaches beyond them, and the last 4 KB when the end-of-image marker is not in the last 64 bytes;
    both rare). It does not decode: see tools.scan for the full check.
    """
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return ZERO_BYTES
            head = f.read(PAGE)
            if not head.startswith(b"\xff\xd8\xff"):
                name = foreign_format(head)
                suffix = os.path.splitext(str(path))[1].lower()
                if name and OTHER_FORMATS.get(suffix) == name:  # a PNG named .png, ...: judged as such
                    return _other_format_problem(f, size, name)
                if name:
                    behind = "a JPEG name" if suffix in (".jpeg", ".jpg", "") else f"a {suffix} name"
                    return f"{name} data behind {behind}"
                return TEXT if _looks_like_text(head) else NOT_AN_IMAGE
            if size <= len(head):
                tail = head[-TAIL:]
            else:
                f.seek(size - TAIL)
                tail = f.read(TAIL)
            problem, sos = _parse_header(_Window(f, head), size)
            if problem is None and not _ends_with_eoi(f, size, tail, sos):
                return TRUNCATED
            return problem
    except OSError as e:
        return f"unreadable ({e.strerror or type(e).__name__})"


def _check_chunk(paths: list) -> list[str | None]:
    return [header_problem(p) for p in paths]


def find_header_problems(paths: Iterable, workers: int = 16) -> list[tuple[str, str]]:
    """`(path, reason)` for every file in `paths` with a header problem, in the order given.

    Threads, not processes: the check is a few system calls per file, and on network or cold storage
    their latency, not the CPU, sets the pace. Paths go to the threads in chunks so that the pool's
    per-task overhead stays well below the check's own cost.
    """
    paths = list(paths)
    if not paths:
        return []
    workers = max(1, min(workers, len(paths)))
    if workers == 1:
        reasons = _check_chunk(paths)
    else:
        size = max(1, min(256, len(paths) // (4 * workers)))
        chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
        with ThreadPoolExecutor(workers) as pool:
            reasons = [r for chunk in pool.map(_check_chunk, chunks) for r in chunk]
    return [(str(p), r) for p, r in zip(paths, reasons) if r is not None]
