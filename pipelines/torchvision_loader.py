"""The torchvision/PIL baseline: the same augmentation semantics as the DALI pipelines, the classic way.

Decoding and augmentation in DataLoader worker processes (PIL), DistributedSampler for sharding, pinned
memory; the batch is cast to the training dtype and channels_last on the device, like DALI's output.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import replace

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipelines.augmentation import Augmentation
from pipelines.erasing import RATIO, SCALE
from pipelines.images import to_rgb
from pipelines.loader import EpochPosition
from pipelines.order import GlobalOrder, ValidationShard
from pipelines.profiler_ranges import named_range
from pipelines.shards import ShardList, describe_source


def training_transform(aug: Augmentation) -> v2.Compose:
    """Crop, flip, TrivialAugment (after the flip, as torchvision's reference script; DALI flips last, which the
    flip's symmetry makes the same distribution), colour jitter, normalisation, then random erasing on the
    normalised pixels (torchvision's RandomErasing, the rule pipelines.erasing follows for the other loaders)."""
    steps = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(aug.image_size, scale=aug.crop_area, ratio=aug.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(p=aug.hflip),
    ]
    if aug.trivial_augment:
        steps.append(v2.TrivialAugmentWide())
    if aug.color_jitter > 0:
        strength = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(aug.mean, aug.std)]
    if aug.random_erase > 0:
        steps.append(v2.RandomErasing(p=aug.random_erase, scale=SCALE, ratio=RATIO, value=0))
    return v2.Compose(steps)


def validation_transform(aug: Augmentation) -> v2.Compose:
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(aug.val_resize_to, antialias=True),
        v2.CenterCrop(aug.val_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(aug.mean, aug.std),
    ])


class ImageDataset(Dataset):
    """One split's images as PIL reads them: the files of class folders (pipelines.folder.ImageList), or the
    tar members of shards (pipelines.shards.ShardList) with their bytes from the store."""

    def __init__(self, image_list, transform):
        self.list, self.transform = image_list, transform
        self.shards = isinstance(image_list, ShardList)

    def __len__(self) -> int:
        return len(self.list)

    def __getitem__(self, index):
        source = io.BytesIO(self.list.read(index)) if self.shards else self.list.files[index]
        with Image.open(source) as image:
            return self.transform(to_rgb(image)), self.list.labels[index]


class TorchvisionLoader(EpochPosition):
    """Training: DistributedSampler(drop_last) + DataLoader(drop_last): floor(floor(N/world)/batch) steps
    on every rank. set_epoch reseeds the global shuffle. Over shards (pipelines.shards.ShardList) only the
    dataset differs: tar members instead of files, the same sharding, order and resume."""

    @classmethod
    def from_request(cls, r, kind) -> "TorchvisionLoader":
        """The loader build_loader asked for (a pipelines.registry.Request)."""
        return cls(r.split, **r.common(), workers=r.settings.workers)

    def __init__(self, split, *, image_list, batch_size, aug: Augmentation, rank, world_size, seed, device, dtype,
                 workers):
        self._begin(split, aug)
        self.num_samples, self.num_classes = len(image_list), len(image_list.classes)
        self.class_counts = image_list.class_counts()
        self.device, self.dtype = torch.device(device), dtype
        self.decode = f"PIL on the CPU ({workers} worker processes per rank), then torchvision transforms" + \
            describe_source(image_list)
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
        self._loader = DataLoader(
            ImageDataset(self._list, transform),
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
