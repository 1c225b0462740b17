"""The order of the sampler-driven loaders (torchvision, torchvision-gpu, over class folders and shards alike).

Training (`GlobalOrder`): one global permutation of all the images per epoch, a function of (seed, epoch)
alone, whatever the world size.

Rank r of world w takes the permutation's slots r, r + w, r + 2w, ... (DistributedSampler's strided split,
with the same permutation: torch.randperm(N) seeded by seed + epoch), so after k steps of batch B the
ranks together have used exactly the slots [0, k * B * w). That is what makes an elastic change exact
(docs/reliability.md, Elastic world size): a group of another size continues the epoch from slot
`start` = the global samples already consumed, splitting the rest over its own ranks. Every segment keeps
whole global batches only (every rank the same number of steps), so the tail of fewer than B * w images is
dropped, as an uninterrupted epoch drops it.

`RN50_SAMPLE_LOG=DIR`: each rank appends one JSON line per training batch it delivers to
DIR/rank<R>-<pid>.jsonl (epoch, world, the batch's first global slot, its image indices); the elastic test
counts with it.

Validation (`ValidationShard`): rank r takes every world-th image, unpadded.
"""

from __future__ import annotations

import json
import os
import time

import torch
from torch.utils.data import Sampler


class GlobalOrder(Sampler):
    """This rank's training indices for the epoch, from global slot `start` on (0: a whole epoch)."""

    def __init__(self, size: int, rank: int, world_size: int, seed: int, batch_size: int):
        self.size, self.rank, self.world, self.seed, self.batch = size, rank, world_size, seed, batch_size
        self.epoch, self.start = 0, 0
        self._perm_epoch, self._perm = None, None
        folder = os.environ.get("RN50_SAMPLE_LOG")
        self._log = os.path.join(folder, f"rank{rank}-{os.getpid()}.jsonl") if folder else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def steps(self, start: int = 0) -> int:
        """Whole global batches left from slot `start`: the same on every rank."""
        return max(0, self.size - start) // (self.batch * self.world)

    def permutation(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)  # DistributedSampler's seeding
            self._perm_epoch, self._perm = self.epoch, torch.randperm(self.size, generator=generator).tolist()
        return self._perm

    def __len__(self) -> int:
        return self.steps(self.start) * self.batch

    def __iter__(self):
        end = self.start + self.steps(self.start) * self.batch * self.world
        return iter(self.permutation()[self.start + self.rank:end:self.world])

    def log(self, batch: int) -> None:
        """RN50_SAMPLE_LOG: record batch `batch` (0-based, counted from `start`) as delivered."""
        if self._log is None:
            return
        slot = self.start + batch * self.batch * self.world
        ids = self.permutation()[slot + self.rank:slot + self.batch * self.world:self.world]
        with open(self._log, "a") as file:
            file.write(json.dumps({"epoch": self.epoch, "world": self.world, "rank": self.rank, "slot": slot,
                                   "ids": ids, "time": time.time()}) + "\n")


class ValidationShard(Sampler):
    """Validation sharding without padding: rank r takes every world-th image, so summed over ranks
    each image is counted once (DistributedSampler pads with repeated images)."""

    def __init__(self, size, rank, world_size):
        self.indices = range(rank, size, world_size)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
