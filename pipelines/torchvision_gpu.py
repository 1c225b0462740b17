"""The `torchvision-gpu` loader: torchvision alone, decoding and augmenting on the training device.

Training:   file bytes read by a pool of threads -> `decode_jpeg(list, device)` (one batched nvJPEG call on
            CUDA; TorchCodec's where it is installed, else torchvision.io's: pipelines.jpeg_decoders) ->
            per-sample RandomResizedCrop as batched matmuls (pipelines.resample) -> flip, colour jitter,
            normalisation as whole-batch tensor ops -> dtype, channels_last.
Validation: libjpeg-turbo (`decode_jpeg` on the CPU, in the threads) -> resize and centre crop batched on
            the device. torchvision's nvJPEG path has no interpolated chroma upsampling, which costs the
            validation pixels their equivalence with PIL's (docs/loaders.md); validation is 4% of the images
            an ImageNet epoch decodes.

With the CPU as the device (no CUDA) the same code runs, decoding in the threads. A background thread
prepares `prefetch` batches ahead on its own CUDA stream, so decoding overlaps the training step. Crops,
flips, jitter and erased regions are drawn from a generator seeded by (seed, rank, epoch, batch), so a resumed epoch
continues with the very augmentations it would have had. Sharding is the torchvision baseline's: the same
DistributedSampler order, every rank the same number of full training batches, every validation image once.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2.functional import rgb_to_grayscale

from pipelines import jpeg_decoders
from pipelines.augmentation import Augmentation
from pipelines.erasing import erase, erase_boxes
from pipelines.loader import EpochPosition
from pipelines.order import GlobalOrder, ValidationShard
from pipelines.profiler_ranges import named_range
from pipelines.resample import resized_crops
from pipelines.settings import one_torch_thread
from pipelines.shards import ShardList, describe_source


def read_image(raw: bytes, decoder: str, decode: bool) -> torch.Tensor:
    """An image file's bytes (uint8 [size]) when it is a JPEG to decode in the batch (`decode` False: on CUDA),
    else its pixels, uint8 CHW RGB, upright (pipelines.jpeg_decoders: a JPEG by `decoder`, another format by PIL
    as the torchvision baseline reads it). A JPEG with an EXIF orientation decodes here too, on the CPU, where
    both decoders apply the tag: the batched CUDA decode of torchvision ignores it. Bytes, not a path: a file of
    a class folder and a tar member of a shard read alike."""
    if decode or raw[:2] != jpeg_decoders.JPEG_MAGIC or jpeg_decoders.exif_orientation(raw) != 1:
        return jpeg_decoders.read_pixels(raw, decoder)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def to_device(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU images on the device in one transfer (a single flat buffer), as views of it."""
    if device.type == "cpu" or not images:
        return images
    flat = torch.cat([image.reshape(-1) for image in images]).pin_memory().to(device, non_blocking=True)
    return [part.view(image.shape) for part, image in zip(flat.split([i.numel() for i in images]), images)]


def random_resized_boxes(heights: torch.Tensor, widths: torch.Tensor, area: tuple, ratio: tuple,
                         generator: torch.Generator) -> torch.Tensor:
    """[n, 4] (top, left, height, width): torchvision's RandomResizedCrop.get_params for n images at once.
    Ten tries per image at an area fraction in `area` and a log-uniform aspect ratio in `ratio`; the first
    that fits is used, else the centre crop with the ratio clamped to the range."""
    n, tries = len(heights), 10
    h_img, w_img = heights.double()[:, None], widths.double()[:, None]
    target = h_img * w_img * torch.empty(n, tries, dtype=torch.float64).uniform_(*area, generator=generator)
    log_ratio = torch.empty(n, tries, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                    generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
    first = fits.to(torch.int8).argmax(1, keepdim=True)  # the first try that fits
    found = fits.any(1)
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    u_top, u_left = torch.rand(n, generator=generator, dtype=torch.float64), torch.rand(n, generator=generator,
                                                                                      dtype=torch.float64)
    top = torch.floor(u_top * (heights - h + 1))
    left = torch.floor(u_left * (widths - w + 1))
    # fallback: the whole image, narrowed to the nearest allowed aspect ratio, centred
    in_ratio = widths.double() / heights.double()
    fw = torch.where(in_ratio > ratio[1], torch.round(heights * ratio[1]), widths.double())
    fh = torch.where(in_ratio < ratio[0], torch.round(widths / ratio[0]), heights.double())
    fh, fw = fh.clamp(max=heights.double()), fw.clamp(max=widths.double())
    ftop, fleft = torch.div(heights - fh, 2, rounding_mode="floor"), torch.div(widths - fw, 2, rounding_mode="floor")
    boxes = torch.stack([torch.where(found, top, ftop), torch.where(found, left, fleft),
                         torch.where(found, h, fh), torch.where(found, w, fw)], dim=1)
    return boxes.long()


def centre_crops(heights: torch.Tensor, widths: torch.Tensor, resize_to: int, size: int):
    """torchvision's Resize(resize_to) + CenterCrop(size) as numbers: each image's resized (height, width)
    (shorter side resize_to, longer side truncated) and the crop's (top, left), rounded half to even."""
    short = torch.minimum(heights, widths)
    new_h = torch.where(heights == short, torch.full_like(heights, resize_to), heights * resize_to // short)
    new_w = torch.where(widths == short, torch.full_like(widths, resize_to), widths * resize_to // short)
    top = torch.round((new_h - size).double() / 2).long()  # torch.round: half to even, as Python's round
    left = torch.round((new_w - size).double() / 2).long()
    return torch.stack([new_h, new_w], 1), torch.stack([top, left], 1)


@dataclass(frozen=True)
class Draws:
    """One batch's random numbers (CPU): crop boxes, flips and the jitter factors."""
    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor  # [n, 3]: brightness, contrast, saturation factors


def draw(aug: Augmentation, heights, widths, generator: torch.Generator) -> Draws:
    n = len(heights)
    boxes = random_resized_boxes(heights, widths, tuple(aug.crop_area), tuple(aug.crop_ratio), generator)
    flip = torch.rand(n, generator=generator) < aug.hflip
    jitter = torch.empty(n, 3).uniform_(*aug.jitter_range, generator=generator) \
        if aug.color_jitter > 0 else torch.ones(n, 3)
    return Draws(boxes, flip, jitter)


def colour_jitter(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation with a factor per image (torchvision's formulas on 0-255 pixels), in
    DALI color_twist's fixed order rather than torchvision's random one; whole-batch ops."""
    brightness, contrast, saturation = (f[:, None, None, None] for f in factors.unbind(1))
    images = (images * brightness).clamp_(0, 255)
    mean = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    images = (images * contrast + mean * (1 - contrast)).clamp_(0, 255)
    return (images * saturation + rgb_to_grayscale(images) * (1 - saturation)).clamp_(0, 255)


class TorchvisionGpuLoader(EpochPosition):
    """The loader interface (docs/design.md) over torchvision's batched decoder and batched tensor ops."""

    @classmethod
    def from_request(cls, r, kind) -> "TorchvisionGpuLoader":
        """The loader build_loader asked for (a pipelines.registry.Request): `workers` reading threads."""
        return cls(r.split, **r.common(), threads=r.settings.workers, prefetch=r.settings.prefetch)

    def __init__(self, split, *, image_list, batch_size, aug: Augmentation, rank, world_size, seed, device, dtype,
                 threads, prefetch):
        self._decoder = jpeg_decoders.jpeg_decoder(batched=True)  # TorchCodec's, else torchvision's
        self._begin(split, aug)
        # class folders or shards: only where the bytes come from differs
        self._shards = isinstance(image_list, ShardList)
        self.num_samples, self.num_classes = len(image_list), len(image_list.classes)
        self.class_counts = image_list.class_counts()
        self.device, self.dtype = torch.device(device), dtype
        self._list, self._batch_size = image_list, batch_size
        self._rank, self._seed, self._prefetch = rank, seed, max(1, prefetch)
        # normalisation on 0-255 pixels, on the device once rather than copied there every batch
        self._mean, self._std = (torch.tensor(v, device=self.device)[None, :, None, None] * 255
                                 for v in (aug.mean, aug.std))
        if self.training:
            # DistributedSampler's order (drop_last), over one permutation whatever the world size
            self.sampler = GlobalOrder(self.num_samples, rank, world_size, seed, batch_size)
        else:
            self.sampler = ValidationShard(self.num_samples, rank, world_size)
        # torch ops on one thread in each of these (one_torch_thread): no OpenMP team beside the training step's
        self._readers = ThreadPoolExecutor(max(1, threads), thread_name_prefix="tv-gpu-read",
                                           initializer=one_torch_thread)
        self._stage = ThreadPoolExecutor(1, thread_name_prefix="tv-gpu-batch",  # decode + augment, in order
                                         initializer=one_torch_thread)
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._decode_in_threads = not (cuda and self.training)
        name = "TorchCodec's decode_jpeg" if self._decoder == "torchcodec" else "torchvision.io.decode_jpeg"
        where = "nvJPEG on the GPU" if cuda else "libjpeg-turbo on the CPU"
        self.decode = (f"{name} batched ({where}), file bytes read by {threads} threads; "
                       f"RandomResizedCrop, flip, jitter and normalisation batched on {self.device.type}"
                       if self.training else
                       f"{name} (libjpeg-turbo) on {threads} CPU threads, then resize and "
                       f"centre crop batched on {self.device.type}") + describe_source(image_list)

    def __len__(self) -> int:
        return len(self.sampler) // self._batch_size + self.first if self.training \
            else math.ceil(len(self.sampler) / self._batch_size)

    def _batches(self) -> list[list[int]]:
        ids, size = list(self.sampler), self._batch_size
        return [ids[start:start + size] for start in range(0, (len(self) - self.first) * size, size)]

    def _generator(self, epoch: int, number: int) -> torch.Generator:
        state = np.random.SeedSequence([self._seed, self._rank, epoch, number]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(state))

    def _read(self, index: int) -> torch.Tensor:
        """In a reading thread: one image's bytes (a file, or a tar member of a shard), decoded there unless
        the batched GPU decode takes it (read_image). A file that cannot be read says which."""
        raw = self._list.read(index) if self._shards else Path(self._list.files[index]).read_bytes()
        try:
            return read_image(raw, self._decoder, self._decode_in_threads)
        except Exception as exc:
            name = "{} (the tar member at byte {})".format(*self._list.member(index)[:2]) \
                if self._shards else self._list.files[index]
            raise RuntimeError(f"cannot decode {name}: {exc}") from exc

    def _decode(self, ids: list[int]) -> list[torch.Tensor]:
        """uint8 CHW images on the device: JPEGs decoded there in one batched call (training on CUDA),
        everything else (and everything on the CPU, validation, and JPEGs with an EXIF orientation) decoded by
        the threads."""
        items = list(self._readers.map(self._read, ids))
        encoded = [i for i, item in enumerate(items) if item.dim() == 1]
        images = to_device([item for item in items if item.dim() == 3], self.device)
        if encoded and self.device.type == "cuda":
            # torchvision's CUDA decode_jpeg allocates its outputs on the current stream (ours) but nvJPEG
            # writes them on a stream of its own (TorchCodec's is not known to differ: the same wait for it): a block freed by kernels still queued on ours could be handed
            # out and overwritten while they run. Waiting for our stream first closes that window.
            torch.cuda.current_stream(self.device).synchronize()
        decoded = jpeg_decoders.decode_jpegs([items[i] for i in encoded], self._decoder, self.device) \
            if encoded else []
        ordered, rest = dict(zip(encoded, decoded)), iter(images)
        return [ordered[i] if i in ordered else next(rest) for i in range(len(items))]

    def _on_device(self):
        """In the stage thread: this rank's GPU and the loader's stream (a new thread starts on GPU 0 and
        the default stream); nothing on the CPU."""
        if self._stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self._stream))
        return stack

    def _prepare(self, epoch: int, number: int, ids: list[int], image_size: int):
        """One batch, in the stage thread: decoded, augmented, on the device (on the loader's stream)."""
        labels = torch.tensor([self._list.labels[i] for i in ids])
        with self._on_device():
            images = self._decode(ids)
            heights = torch.tensor([image.shape[1] for image in images])  # shapes are known on the host
            widths = torch.tensor([image.shape[2] for image in images])
            generator = self._generator(epoch, number) if self.training else None
            pixels = self._training_pixels(images, heights, widths, generator, image_size) \
                if self.training else self._validation_pixels(images, heights, widths, image_size)
            pixels = ((pixels - self._mean) / self._std).to(self.dtype).contiguous(memory_format=torch.channels_last)
            if self.training and self._aug.random_erase > 0:  # on the normalised pixels, as torchvision's
                erase(pixels, erase_boxes(len(ids), image_size, image_size, self._aug.random_erase, generator))
            labels = labels.to(self.device, non_blocking=True)
            ready = None
            if self._stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._stream)
        return pixels, labels, ready

    def _training_pixels(self, images, heights, widths, generator, size: int) -> torch.Tensor:
        """RandomResizedCrop (crops are views; one batched resize), flip and colour jitter: 0-255 floats."""
        drawn = draw(self._aug, heights, widths, generator)
        crops = [image[:, t:t + h, l:l + w] for image, (t, l, h, w) in zip(images, drawn.boxes.tolist())]
        n = len(crops)
        pixels = resized_crops(crops, torch.full((n, 2), size), torch.zeros(n, 2, dtype=torch.long), size)
        flip = drawn.flip.to(self.device, non_blocking=True)[:, None, None, None]
        pixels = torch.where(flip, pixels.flip(-1), pixels)
        if self._aug.color_jitter > 0:
            pixels = colour_jitter(pixels, drawn.jitter.to(self.device, non_blocking=True))
        return pixels

    def _validation_pixels(self, images, heights, widths, size: int) -> torch.Tensor:
        """Resize(size / val_resize_ratio) + CenterCrop(size), as torchvision computes them: 0-255 floats."""
        resize_to = replace(self._aug, val_image_size=size).val_resize_to
        resized, corners = centre_crops(heights, widths, resize_to, size)
        return resized_crops(images, resized, corners, size)

    def __iter__(self):
        # A resumed epoch starts at `position`; the batches in flight run on in the stage thread.
        ahead = iter(list(enumerate(self._batches(), start=self.first))[self.position - self.first:])
        pending = deque()

        def submit_next():
            for number, ids in ahead:
                pending.append(self._stage.submit(self._prepare, self.epoch, number, ids, self.image_size))
                return

        for _ in range(self._prefetch):
            submit_next()
        while pending:
            with named_range("host-to-device copy"):  # waiting for the batch's decode and augmentation
                images, labels, ready = pending.popleft().result()
                if ready is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(ready)
                    images.record_stream(current)  # made on the loader's stream, used on this one
                    labels.record_stream(current)
            submit_next()
            self.position += 1
            if self.training:
                self.sampler.log(self.position - 1 - self.first)  # RN50_SAMPLE_LOG only
            yield images, labels
        self.position = 0

    # a new image size needs nothing rebuilt: every batch is prepared at the size it is submitted with
    def _enter_epoch(self, epoch: int) -> None:
        if self.training:
            self.sampler.set_epoch(epoch)
