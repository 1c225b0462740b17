"""Synthetic data: one device-resident batch served every step. The GPU ceiling, and a fast test double.

No decoding, no host-to-device copies: whatever end-to-end training loses against this loader is what
the input pipeline costs.
"""

from __future__ import annotations

import torch


class SyntheticLoader:
    def __init__(self, split, *, image_list, batch_size, aug, rank, world_size, seed, device,
                 dtype, num_classes=1000, num_samples=None, **_unused):
        # With a data folder, mimic its size (same steps per epoch as the real loaders); else num_samples.
        # random labels: every class equally likely, whatever the folder's counts
        self.class_counts = None
        if image_list is not None:
            num_samples, num_classes = len(image_list), len(image_list.classes)
        self.num_samples = num_samples if num_samples is not None else batch_size * world_size
        self.num_classes = num_classes
        self.training = split == "train"
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
        self._aug, self._batch_size, self._device, self._dtype = aug, batch_size, device, dtype
        self._make_batch(aug.train_size(0) if self.training else aug.val_size)
        self.epoch = 0
        self.position = 0  # batches of the current epoch already delivered

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self):
        for self.position, size in enumerate(self._sizes[self.position:], start=self.position + 1):
            yield self.images[:size], self.labels[:size]
        self.position = 0

    def _make_batch(self, size: int) -> None:
        generator = torch.Generator().manual_seed(self._seed)
        images = torch.randn(self._batch_size, 3, size, size, generator=generator)
        self.images = images.to(device=self._device, dtype=self._dtype).contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, self.num_classes, (self._batch_size,), generator=generator).to(self._device)
        self.image_size = size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.training and self._aug.train_size(epoch) != self.image_size:  # progressive resizing
            self._make_batch(self._aug.train_size(epoch))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"])
        self.position = state["position"]
