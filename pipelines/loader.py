"""What every loader is (the `Loader` protocol) and what every loader shares (`EpochLoader`).

The training loop, the harness and evaluation see nothing of a loader but `Loader` (docs/design.md, The
loader interface). `EpochLoader` holds, once for every loader, the two things that are the same whatever
decodes the images:

- the epoch's image size: `set_epoch(e)` asks the augmentation spec for it (`Augmentation.train_size(e)`,
  progressive resizing; validation's size never changes) and, when it changes, calls the loader's one hook,
  `_resize()`, which rebuilds or reshapes at `self.image_size`;
- the resume state, of one of two kinds: `EpochPosition` (the epoch and the batches of it already delivered,
  for the loaders driven by a sampler: torchvision, torchvision-gpu, synthetic) or `DaliCheckpoint` (the epoch
  and the DALI pipeline's own checkpoint). Neither holds the data's identity: a resume on other data is
  refused at start-up, by the run (rn50.reliability.lifecycle.check_data, from pipelines.listing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

from pipelines.errors import UserError

if TYPE_CHECKING:
    import torch

    from pipelines.augmentation import Augmentation


@runtime_checkable
class Loader(Protocol):
    """One split's batches for this rank. Iterating yields (images [N, 3, H, W] channels_last in the asked dtype
    on the device, labels int64 [N] on the same device)."""

    num_samples: int  # images in the split, all ranks together
    num_classes: int
    class_counts: tuple[int, ...] | None  # images per class of this split by label; None: synthetic (uniform)
    image_size: int  # this epoch's crop size (progressive resizing changes it at set_epoch)
    decode: str  # the decode path in words, for reports

    def __iter__(self) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]: ...

    def __len__(self) -> int:
        """Steps per epoch for this rank: the same on every rank in training."""

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class EpochLoader:
    """The epoch and its image size, for every loader. A subclass calls `_begin` first in
    its constructor, then builds its pipeline at `self.image_size`; it may override `_enter_epoch(epoch)` (a
    sampler's reshuffle) and `_resize()` (a rebuild at the new `self.image_size`)."""

    training: bool
    epoch: int
    position: int
    image_size: int

    def _begin(self, split: str, aug: "Augmentation") -> None:
        self.split = split
        self.training = split == "train"
        self._aug = aug
        self.epoch = 0
        self.position = 0  # batches of the current epoch already delivered
        self.image_size = self.size_at(0)

    def size_at(self, epoch: int) -> int:
        """The crop size of an epoch: the augmentation spec's, the one rule for every loader."""
        return self._aug.train_size(epoch) if self.training else self._aug.val_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._enter_epoch(epoch)
        size = self.size_at(epoch)
        if size != self.image_size:  # progressive resizing: only training sizes change
            self.image_size = size
            self._resize()

    def _enter_epoch(self, epoch: int) -> None:
        """What a new epoch means besides its size (a sampler's reshuffle); nothing by default."""

    def _resize(self) -> None:
        """Deliver `self.image_size` from now on; by default the loader reads it at every batch."""


class EpochPosition(EpochLoader):
    """Resume state of the loaders driven by a sampler: the epoch, and the batches of it already delivered,
    which a resumed epoch skips (the sampler's order is a function of the seed and the epoch, whatever the
    world size: pipelines.order.GlobalOrder).

    After an elastic change of the world size (rn50.reliability.lifecycle.resume_point) the epoch continues as a
    segment: from step `first` on, this rank's batches start at the epoch's global slot `start` (the images
    the earlier group consumed); both are 0 in a whole epoch, and reset by set_epoch."""

    start = 0  # global samples of the epoch consumed before this segment
    first = 0  # the step at which this segment starts (its batches are numbered first, first + 1, ...)

    def set_epoch(self, epoch: int) -> None:
        self.start = self.first = 0
        super().set_epoch(epoch)

    def state_dict(self) -> dict:
        segment = {"start": self.start, "first": self.first} if self.start or self.first else {}  # elastic only
        return {"epoch": self.epoch, "position": self.position, **segment}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"])
        self.position = state["position"]
        self.start, self.first = state.get("start", 0), state.get("first", 0)
        sampler = getattr(self, "sampler", None)
        if self.training and hasattr(sampler, "start"):  # pipelines.order.GlobalOrder
            sampler.start = self.start


class DaliCheckpoint(EpochLoader):
    """Resume state of the DALI loaders: the epoch, and the pipeline's own checkpoint (reader position and
    every random stream), from which `_build(checkpoint)` continues bit for bit. A resolution change is the
    same graph rebuilt at the new size from the running pipeline's checkpoint."""

    _iterator: object  # DALIGenericIterator

    def _build(self, checkpoint) -> None:
        raise NotImplementedError

    def _checkpoint(self):
        return self._iterator.checkpoints()[0]

    def _resize(self) -> None:
        # from the running pipeline's checkpoint: the reader's order and the augmentation streams go on as if
        # nothing changed
        self._build(checkpoint=self._iterator.checkpoints()[0])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "dali": self._checkpoint()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.image_size = self.size_at(self.epoch)  # the resolution of the checkpoint's epoch
        self._build(checkpoint=state["dali"])


def endless(loader: "Loader") -> Iterator:
    """Batches across epoch boundaries (set_epoch 0, 1, ...), so a timed window may be longer than one epoch of a
    small dataset: the benchmark harness's and the shootout's. A loader with no batch in an epoch is an error,
    never an endless spin."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        delivered = 0
        for batch in loader:
            delivered += 1
            yield batch
        if not delivered:  # build_loader refuses a share smaller than a batch; never spin on an empty loader
            raise UserError(f"the loader delivered no batch in epoch {epoch}; lower --batch-size")
        epoch += 1
