"""The DALI loader over shards: the pipelines of pipelines/dali.py, fed with tar members (pipelines.shards)
through an external source instead of fn.readers.file; the graph after the reader is the same.

Which member goes to which rank and step is `pipelines.shards.epoch_order`, a function of (seed, epoch, rank,
world size) as for the folders, so equal steps per rank, every validation image counted once and a
bit-identical mid-epoch resume carry over (docs/data.md).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

import pipelines.dali as dali  # its fn and types: None without DALI, which DaliBase refuses first
from pipelines.dali import DaliBase, make_iterator
from pipelines.shards import ShardList, describe_source, epoch_order
from pipelines.storage import StorageLost


class _BatchSource:
    """DALI's external source for one rank: batch `iteration` of epoch `offset + epoch_idx` is a pure
    function of those numbers, so DALI's checkpoint (which saves epoch_idx and iteration for a callable
    taking BatchInfo) and a restart from it give bit-identical batches. Holds no reference to the loader
    (a loader <-> pipeline cycle would keep the pipeline alive)."""

    def __init__(self, image_list: ShardList, *, rank, world_size, seed, batch_size, training, offset, threads):
        self.list, self.rank, self.world, self.seed = image_list, rank, world_size, seed
        self.batch, self.training, self.offset = batch_size, training, offset
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-read")
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            order = epoch_order(len(self.list), self.rank, self.world, self.seed, epoch, self.training)
            if self.training:  # whole batches only: every rank the same number of steps
                order = order[:len(order) // self.batch * self.batch]
            self._order_epoch, self._order = epoch, order
        return self._order

    def __call__(self, info):
        order = self.order(self.offset + info.epoch_idx)
        start = info.iteration * self.batch
        if start >= len(order):
            raise StopIteration
        ids = order[start:start + self.batch]
        # the last validation batch is padded with its last image to a full batch; the iterator's size
        # (this rank's true count) and LastBatchPolicy.PARTIAL drop the padding again
        ids = ids + [ids[-1]] * (self.batch - len(ids))
        data = self.list.read_many(ids, self.pool)
        return ([np.frombuffer(d, dtype=np.uint8) for d in data],
                [np.array([self.list.labels[i]], dtype=np.int32) for i in ids])

    def reader(self):
        """The reader of the DALI graph (pipelines.dali._reader): this source's (bytes, label) batches."""
        return dali.fn.external_source(source=self, num_outputs=2, batch=True, batch_info=True,
                                       dtype=[dali.types.UINT8, dali.types.INT32])


class ShardDaliLoader(DaliBase):
    """The loader interface (docs/design.md) over tar members, fed to the DALI pipelines by `_BatchSource`.
    Its resume state is DaliCheckpoint's, with where the pipeline's epochs start (a restarted epoch) and the
    batches delivered."""

    def _reading(self, *, rank: int, world_size: int, seed: int, threads: int) -> None:
        self._rank, self._world, self._seed = rank, world_size, seed
        self._threads = max(4, 2 * threads)  # reads wait on storage, not the CPU
        # self.position (EpochLoader): batches of the current epoch delivered (the step a StorageLost stops at)
        self._lost_at = None  # the pipeline's checkpoint at the last delivered batch, after a StorageLost
        self._offset, self._dali_epoch = 0, 0  # our epoch = offset + DALI's epoch index
        share = len(epoch_order(self.num_samples, rank, world_size, seed, 0, self.training))
        self._steps = share // self.batch_size if self.training else -(-share // self.batch_size)
        self._size = self._steps * self.batch_size if self.training else share
        self.decode += describe_source(self._list, self._threads)

    def _build(self, checkpoint):
        self._lost_at = None
        source = _BatchSource(self._list, rank=self._rank, world_size=self._world, seed=self._seed,
                              batch_size=self.batch_size, training=self.training, offset=self._offset,
                              threads=self._threads)
        # an external source has no reader name: the iterator's size is this rank's exact epoch
        self._iterator = make_iterator(self._pipeline(source, None, checkpoint), self.training, self._size)

    def __len__(self) -> int:
        return self._steps

    def __iter__(self):
        self._lost_at = None
        while True:
            # DALI reads ahead (prefetch): a read that fails is for a batch beyond the last one delivered, and
            # the pipeline's own checkpoint has moved past it. The checkpoint as of the last delivered batch
            # (0.07 ms to take; 0.5 ms with RandAugment) is kept, so a StorageLost stop resumes exactly there.
            good = self._iterator.checkpoints()[0]
            try:
                outputs = next(self._iterator)
            except StopIteration:
                break
            except StorageLost:
                self._lost_at = good
                raise
            batch = self._batch(outputs)
            self.position += 1
            yield batch
        self.position = 0
        self._dali_epoch += 1

    def _enter_epoch(self, epoch: int) -> None:
        if epoch != self._offset + self._dali_epoch:
            # an epoch this pipeline is not at (a run restarting an interrupted epoch with new sharding):
            # a fresh pipeline whose first epoch is this one, at this epoch's size
            self._offset, self._dali_epoch, self.position = epoch, 0, 0
            self.image_size = self.size_at(epoch)
            self._build(checkpoint=None)

    def _checkpoint(self):
        # after a StorageLost: the pipeline as of the last delivered batch (DALI had read ahead)
        return self._lost_at if self._lost_at is not None else self._iterator.checkpoints()[0]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "offset": self._offset, "dali_epoch": self._dali_epoch,
                "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self._offset, self._dali_epoch, self.position = state["offset"], state["dali_epoch"], state["position"]
        super().load_state_dict(state)
