"""The torchvision/PIL baseline: the same augmentation semantics as the DALI pipelines, the classic way.

Decoding and augmentation in DataLoader worker processes (PIL), DistributedSampler for sharding, pinned
memory; the batch is cast to the training dtype and channels_last on the device, like DALI's output.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipelines.augmentation import Augmentation
from pipelines.loader import EpochPosition
from pipelines.order import GlobalOrder
from pipelines.ranges import named_range


def training_transform(aug: Augmentation) -> v2.Compose:
    steps = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(aug.image_size, scale=aug.crop_area, ratio=aug.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(p=aug.hflip),
    ]
    if aug.color_jitter > 0:
        strength = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(aug.mean, aug.std)])


def validation_transform(aug: Augmentation) -> v2.Compose:
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(aug.val_resize_to, antialias=True),
        v2.CenterCrop(aug.val_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(aug.mean, aug.std),
    ])


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


class JpegFolder(Dataset):
    def __init__(self, files, labels, transform):
        self.files, self.labels, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        with Image.open(self.files[index]) as image:
            return self.transform(to_rgb(image)), self.labels[index]


class ValidationShard(torch.utils.data.Sampler):
    """Validation sharding without padding: rank r takes every world-th image, so summed over ranks
    each image is counted once (DistributedSampler pads with repeated images)."""

    def __init__(self, size, rank, world_size):
        self.indices = range(rank, size, world_size)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class TorchvisionLoader(EpochPosition):
    """Training: DistributedSampler(drop_last) + DataLoader(drop_last): floor(floor(N/world)/batch) steps
    on every rank. set_epoch reseeds the global shuffle. Over shards (pipelines.shards.ShardList) only the
    dataset differs: tar members instead of files, the same sharding, order and resume."""

    def __init__(self, split, *, image_list, batch_size, aug: Augmentation, rank, world_size, seed, device, dtype,
                 workers):
        self._begin(split, aug, image_list)
        self.num_samples, self.num_classes = len(image_list), len(image_list.classes)
        self.class_counts = image_list.class_counts()
        self.device, self.dtype = torch.device(device), dtype
        self.decode = f"PIL on the CPU ({workers} worker processes per rank), then torchvision transforms"
        if self._shards is not None:
            from pipelines.shards import where

            self.decode += f"; bytes from tar members ({where(image_list)})"
        self._list, self._batch_size, self._workers = image_list, batch_size, workers
        if self.training:
            # DistributedSampler's order (drop_last), over one permutation whatever the world size
            self.sampler = GlobalOrder(self.num_samples, rank, world_size, seed, batch_size)
        else:
            self.sampler = ValidationShard(self.num_samples, rank, world_size)
        self._resize()

    def _resize(self) -> None:
        """Workers persist across epochs with their copy of the transform: a new resolution (progressive
        resizing) needs new workers, so a size change makes a new DataLoader."""
        transform = training_transform(replace(self._aug, image_size=self.image_size)) if self.training \
            else validation_transform(self._aug)
        if self._shards is not None:
            from pipelines.shards import ShardDataset

            dataset = ShardDataset(self._list, transform)
        else:
            dataset = JpegFolder(self._list.files, self._list.labels, transform)
        self._loader = DataLoader(
            dataset,
            batch_size=self._batch_size,
            sampler=self.sampler,
            num_workers=self._workers,
            pin_memory=self.device.type == "cuda",
            drop_last=self.training,
            persistent_workers=self._workers > 0,
            prefetch_factor=4 if self._workers > 0 else None,
        )

    def __len__(self) -> int:
        return len(self._loader) + self.first  # an elastic segment's loader holds the epoch's rest only

    def __iter__(self):
        # A resumed epoch skips the batches already trained on. The sampler's order is exact (seeded by
        # the epoch); the random augmentations of worker processes are not reproduced (DALI's are).
        batches = itertools.islice(self._loader, self.position - self.first, None)
        for self.position, (images, labels) in enumerate(batches, start=self.position + 1):
            if self.training:
                self.sampler.log(self.position - 1 - self.first)  # RN50_SAMPLE_LOG only
            with named_range("host-to-device copy"):  # with the cast to the step's dtype and channels_last
                images = images.to(self.device, non_blocking=True).to(self.dtype)
                images = images.contiguous(memory_format=torch.channels_last)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels
        self.position = 0

    def _enter_epoch(self, epoch: int) -> None:
        if self.training:
            self.sampler.set_epoch(epoch)
