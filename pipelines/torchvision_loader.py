"""The torchvision/PIL baseline: the same augmentation semantics as the DALI pipelines, the classic way.

Decoding and augmentation in DataLoader worker processes, DistributedSampler for sharding, pinned memory. Each
worker makes its samples in the training dtype, normalised, and collates them channels_last (NHWC in memory)
into shared memory: the main process only moves the batch to the device. JPEGs decode by libjpeg-turbo
(pipelines.jpeg_decoders: TorchCodec, else torchvision.io), other formats by PIL; crops resize as uint8 tensors,
or in PIL where PIL decoded the image and PIL is pillow-simd (its resize is the faster then: docs/loaders.md).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.transforms import v2

from pipelines import jpeg_decoders
from pipelines.augmentation import Augmentation
from pipelines.erasing import RATIO, SCALE
from pipelines.loader import EpochPosition
from pipelines.order import GlobalOrder, ValidationShard
from pipelines.profiler_ranges import named_range
from pipelines.shards import ShardList, describe_source


class NormalizeTo:
    """uint8 CHW pixels -> (pixel / 255 - mean) / std in `dtype`, as one scale and shift in float32 and one cast
    (what ToDtype(float32, scale=True) + Normalize + a cast compute, within one step of the last bit of fp16)."""

    def __init__(self, mean, std, dtype: torch.dtype):
        std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.scale, self.shift, self.dtype = 1 / (255 * std), -torch.tensor(mean)[:, None, None] / std, dtype

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.to(torch.float32).mul_(self.scale).add_(self.shift).to(self.dtype)


def training_transform(aug: Augmentation, dtype: torch.dtype) -> v2.Compose:
    """Crop, flip, TrivialAugment (after the flip, as torchvision's reference script; DALI flips last, which the
    flip's symmetry makes the same distribution), colour jitter, normalisation to `dtype`, then random erasing on
    the normalised pixels (torchvision's RandomErasing, the rule pipelines.erasing follows for the other loaders).
    On uint8 CHW tensors, or PIL images (pillow-simd's resize: ImageDataset.keep_pil) until PILToTensor."""
    steps = [
        v2.RandomResizedCrop(aug.image_size, scale=aug.crop_area, ratio=aug.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(p=aug.hflip),
        v2.PILToTensor(),  # a PIL image's pixels (a tensor passes as it is)
    ]
    if aug.trivial_augment:
        steps.append(v2.TrivialAugmentWide())
    if aug.color_jitter > 0:
        strength = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    steps.append(NormalizeTo(aug.mean, aug.std, dtype))
    if aug.random_erase > 0:
        steps.append(v2.RandomErasing(p=aug.random_erase, scale=SCALE, ratio=RATIO, value=0))
    return v2.Compose(steps)


def validation_transform(aug: Augmentation, dtype: torch.dtype) -> v2.Compose:
    """On uint8 CHW tensors always: torch's uint8 resize, the one the other loaders' validation matches."""
    return v2.Compose([
        v2.Resize(aug.val_resize_to, antialias=True),
        v2.CenterCrop(aug.val_size),
        NormalizeTo(aug.mean, aug.std, dtype),
    ])


@lru_cache(maxsize=1)
def pillow_simd() -> bool:
    """Whether PIL is pillow-simd (a drop-in build of Pillow with SIMD resampling, installed in its place)."""
    from importlib.metadata import PackageNotFoundError, version

    import PIL

    try:
        return version("pillow-simd") == PIL.__version__
    except PackageNotFoundError:
        return False


def collate_channels_last(samples):
    """(images [n, C, H, W] channels_last, labels [n]) from (CHW image, label) samples: the images stacked into
    one NHWC buffer, in shared memory when in a worker process (the batch then travels to the main process as a
    handle, as default_collate's does), seen as NCHW."""
    images, labels = zip(*samples)
    (channels, height, width), count = images[0].shape, len(images)
    out = torch.empty(count, height, width, channels, dtype=images[0].dtype)
    if get_worker_info() is not None:
        out.share_memory_()
    torch.stack([image.permute(1, 2, 0) for image in images], out=out)
    return out.permute(0, 3, 1, 2), torch.tensor(labels)


class ImageDataset(Dataset):
    """One split's images, decoded (pipelines.jpeg_decoders): the files of class folders (pipelines.folder.
    ImageList), or the tar members of shards (pipelines.shards.ShardList) with their bytes from the store.
    keep_pil: the images PIL decodes stay PIL images for the transform (its resize: pillow-simd's)."""

    def __init__(self, image_list, transform, decoder: str, keep_pil: bool):
        self.list, self.transform, self.decoder, self.keep_pil = image_list, transform, decoder, keep_pil
        self.shards = isinstance(image_list, ShardList)

    def __len__(self) -> int:
        return len(self.list)

    def __getitem__(self, index):
        raw = self.list.read(index) if self.shards else Path(self.list.files[index]).read_bytes()
        image = jpeg_decoders.read_pixels(raw, self.decoder, self.keep_pil)
        return self.transform(image), self.list.labels[index]


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
        self._decoder = jpeg_decoders.jpeg_decoder()
        # Measured per 400x350 photo: libjpeg-turbo 0.44 ms + torch's uint8 resize 0.15 beat PIL's decode 0.50 +
        # pillow-simd's resize 0.13; PIL's own resize (0.44) loses to torch's. So PIL resizes only what PIL decodes,
        # and only where it is pillow-simd (docs/loaders.md)
        self._keep_pil = self.training and pillow_simd()
        resize = "pillow-simd" if self._keep_pil else "torch"
        self.decode = (f"{jpeg_decoders.describe(self._decoder)} for JPEGs, PIL for other formats, in {workers} "
                       f"worker processes per rank; torchvision transforms ({resize} resize), normalised to "
                       f"{str(dtype).removeprefix('torch.')} channels_last there") + describe_source(image_list)
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
        transform = training_transform(replace(self._aug, image_size=self.image_size), self.dtype) \
            if self.training else validation_transform(self._aug, self.dtype)
        self._loader = DataLoader(
            ImageDataset(self._list, transform, self._decoder, self._keep_pil),
            batch_size=self._batch_size,
            collate_fn=collate_channels_last,
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
            with named_range("host-to-device copy"):  # the workers made the dtype and the layout
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels
        self.position = 0

    def _enter_epoch(self, epoch: int) -> None:
        if self.training:
            self.sampler.set_epoch(epoch)
