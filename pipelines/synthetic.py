"""Synthetic data: one device-resident batch served every step. The GPU ceiling, and a fast test double.

No decoding, no host-to-device copies: whatever end-to-end training loses against this loader is what
the input pipeline costs. Its epoch, image size and resume state are every loader's (pipelines.loader).
"""

from __future__ import annotations

import torch

from pipelines.loader import EpochPosition


class SyntheticLoader(EpochPosition):
    @classmethod
    def from_request(cls, r, kind) -> "SyntheticLoader":
        """The loader build_loader asked for (a pipelines.registry.Request): without data, its own size."""
        return cls(r.split, **r.common(), num_classes=r.num_classes, num_samples=r.num_samples)

    def __init__(self, split, *, image_list, batch_size, aug, rank, world_size, seed, device, dtype,
                 num_classes, num_samples):
        # With a data folder, mimic its size (same steps per epoch as the real loaders); else num_samples.
        # random labels: every class equally likely, whatever the folder's counts
        self._begin(split, aug)
        self.class_counts = None
        if image_list is not None:
            num_samples, num_classes = len(image_list), len(image_list.classes)
        self.num_samples = num_samples if num_samples is not None else batch_size * world_size
        self.num_classes = num_classes
        self.decode = "none: one device-resident batch"
        # Training: floor(N / world) full batches on every rank. Validation: this rank's exact share
        # (rank r takes images r, r + world, ...), the last batch partial, as the real loaders count.
        if self.training:
            self._sizes = [batch_size] * (self.num_samples // world_size // batch_size)
        else:
            share = len(range(rank, self.num_samples, world_size))
            self._sizes = [min(batch_size, share - start) for start in range(0, share, batch_size)]
        # Validation draws other images and labels than training: a model that memorised the training
        # batch must not look as if it learned (top-1 stays near chance, 1/num_classes).
        self._seed = (seed * 1000 + rank) * 2 + (0 if self.training else 1)
        self._batch_size, self._device, self._dtype = batch_size, device, dtype
        self._resize()

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self):
        for self.position, size in enumerate(self._sizes[self.position:], start=self.position + 1):
            yield self.images[:size], self.labels[:size]
        self.position = 0

    def _resize(self) -> None:
        """The batch at self.image_size (progressive resizing makes a new one)."""
        generator = torch.Generator().manual_seed(self._seed)
        size = self.image_size
        images = torch.randn(self._batch_size, 3, size, size, generator=generator)
        self.images = images.to(device=self._device, dtype=self._dtype).contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, self.num_classes, (self._batch_size,), generator=generator).to(self._device)
