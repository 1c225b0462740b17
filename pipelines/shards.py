"""ImageNet as WebDataset tar shards (`python -m tools.shard` writes them): the listing and the loaders.

The design (docs/data.md says why): a shard folder is turned into the same kind of image list the folder
path uses, an ordered list of samples with labels, where a sample is a tar member (shard, byte offset,
size) instead of a file. Every loader keeps its sampler: which image goes to which rank and step is a
function of (seed, epoch, rank, world size) exactly as for folders, so equal steps per rank, every
validation image counted once, and bit-identical mid-epoch resume carry over unchanged; only the source of
the bytes differs (pipelines.storage: local or network file system, or S3).

Layout of a shard folder (or s3://bucket/prefix):

    dataset.json                 format, classes (index = label), per split: count, class counts,
                                 shards [{name, index, count, size, sha256}], members table, left-out files
    <split>-NNNNNN.tar           WebDataset shards: per sample `KEY.<ext>` (the image's bytes, untouched)
                                 and `KEY.cls` (its class index as text); written in a global shuffle
    <split>-NNNNNN.idx           DALI's wds2idx index of that shard (fn.readers.webdataset reads it)
    <split>-members.npy          int64 [N, 4]: shard number, byte offset, size, label, in shard order: the
                                 whole split's member offsets in one read (not one per shard)

The data identity of a split is a digest of its dataset.json entry (every shard's sha256 and size, and the
members table's): loaders put it in their state, and a resume against other shards is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipelines.errors import UserError
from pipelines.loader import DaliCheckpoint
from pipelines.storage import StorageLost, is_s3, normalise, open_store

FORMAT = "rn50-shards/1"
DATASET_JSON = "dataset.json"
COLUMNS = ("shard", "offset", "size", "label")  # of the members table


def is_shards(data) -> bool:
    """--data names shards (s3://..., or a folder with dataset.json) rather than class folders."""
    if data is None:
        return False
    if is_s3(data):
        return True
    return (Path(normalise(data)) / DATASET_JSON).is_file()


def classes_of(data) -> tuple[str, ...]:
    """Class names, index = label, of a class-folder dataset or a shard set."""
    if is_shards(data):
        return tuple(read_dataset(open_store(normalise(data)))["classes"])
    from pipelines.folder import class_names

    return class_names(str(data))


def split_identity(classes, entry: dict) -> str:
    """The digest a checkpoint keeps: classes, every shard's name, size and sha256, the members table's."""
    shards = [(s["name"], s["size"], s["sha256"]) for s in entry["shards"]]
    blob = json.dumps({"classes": list(classes), "count": entry["count"], "shards": shards,
                       "members": entry["members"]["sha256"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class ShardList:
    """A split of a shard set: what `pipelines.folder.ImageList` is for a folder, with tar members for files."""

    location: str  # the folder or s3://bucket/prefix
    split: str
    classes: tuple[str, ...]
    labels: tuple[int, ...]
    table: np.ndarray  # int64 [N, 4]: shard number, offset, size, label
    shard_names: tuple[str, ...]
    identity: str
    store: object

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> tuple[int, ...]:
        return tuple(np.bincount(self.table[:, 3], minlength=len(self.classes)).tolist())

    @property
    def root(self) -> str:
        return self.location

    def member(self, index: int) -> tuple[str, int, int]:
        shard, offset, size, _ = self.table[index]
        return self.shard_names[shard], int(offset), int(size)

    def read(self, index: int) -> bytes:
        return self.store.read_range(*self.member(index))

    def read_many(self, indices, pool: ThreadPoolExecutor | None) -> list[bytes]:
        """The members' bytes in order; concurrent with a pool (an object store answers one request in
        milliseconds, many at once in about the same time)."""
        if pool is None:
            return [self.read(i) for i in indices]
        return list(pool.map(self.read, indices))


def read_dataset(store) -> dict:
    if not store.exists(DATASET_JSON):
        if is_s3(store.location):
            raise UserError(f"{store.location}/{DATASET_JSON} does not exist; upload the folder `python -m tools.shard` "
                            f"wrote (e.g. `aws s3 sync SHARDS {store.location}`) or fix the prefix in --data")
        raise UserError(f"{store.location} holds no {DATASET_JSON}; write shards with `python -m tools.shard SRC "
                        f"--out {store.location}` (or pass a folder with train/<class>/ and val/<class>/)")
    try:
        meta = json.loads(store.read_object(DATASET_JSON))
    except ValueError:
        raise UserError(f"{store.location}/{DATASET_JSON} is not valid JSON; write the shards again with "
                        "`python -m tools.shard`") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{store.location}/{DATASET_JSON} is format {meta.get('format')!r}, not {FORMAT!r}; write "
                        "the shards again with this version's `python -m tools.shard`")
    return meta


@lru_cache(maxsize=8)
def list_shard_split(location: str, split: str) -> ShardList:
    """One split of the shard set at `location`, checked: the members table matches its checksum and every
    shard is there at the size dataset.json gives (a shard rewritten since is caught at start-up)."""
    location = normalise(location)
    store = open_store(location)
    meta = read_dataset(store)
    entry = meta["splits"].get(split)
    if entry is None:
        raise UserError(f"{location} holds no {split} split; shard a folder with {split}/<class>/ "
                        "(`python -m tools.shard SRC --out DST`)")
    raw = store.read_object(entry["members"]["name"])
    if hashlib.sha256(raw).hexdigest() != entry["members"]["sha256"]:
        raise UserError(f"{location}/{entry['members']['name']} does not match its checksum in {DATASET_JSON}; "
                        "write the shards again with `python -m tools.shard`")
    table = np.load(io.BytesIO(raw), allow_pickle=False)
    for shard in entry["shards"]:
        if not store.exists(shard["name"]):
            raise UserError(f"shard {location}/{shard['name']} is missing; copy the whole folder tools.shard "
                            "wrote, or write the shards again")
        if store.size(shard["name"]) != shard["size"]:
            raise UserError(f"shard {location}/{shard['name']} is {store.size(shard['name'])} bytes, not the "
                            f"{shard['size']} that {DATASET_JSON} records; it changed: write the shards again "
                            "(`python -m tools.shard ... --verify` checks them)")
    classes = tuple(meta["classes"])
    return ShardList(location, split, classes, tuple(table[:, 3].tolist()), table,
                     tuple(s["name"] for s in entry["shards"]), split_identity(classes, entry), store)


def check_identity(state: dict, image_list: ShardList) -> None:
    """A resume reads the very shards the checkpoint was trained on, or stops with one line."""
    saved = state.get("data")
    if saved is not None and saved != image_list.identity:
        raise UserError(f"the shards at {image_list.location} changed since this checkpoint was written ({image_list.split} "
                        f"identity {image_list.identity}, checkpoint {saved}), so its position in the epoch means "
                        "other images; resume with the shards it trained on, or start a new run with a new --out")
    if saved is None:
        raise UserError("this checkpoint was written by a loader reading class folders, not shards; resume with "
                        "--data pointing at those folders, or start a new run with a new --out")


def epoch_order(n: int, rank: int, world_size: int, seed: int, epoch: int, training: bool) -> list[int]:
    """This rank's samples for the epoch: the torchvision baseline's DistributedSampler order (a global
    shuffle seeded by seed + epoch, drop_last) for training; rank r's r, r + world, ... for validation."""
    if not training:
        return list(range(rank, n, world_size))
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    return list(iter(sampler))


def where(image_list: ShardList) -> str:
    return "S3" if is_s3(image_list.location) else "local shards"


# ---------------------------------------------------------------------------------------------- DALI


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
        from nvidia.dali import fn, types

        return fn.external_source(source=self, num_outputs=2, batch=True, batch_info=True,
                                  dtype=[types.UINT8, types.INT32])


class ShardDaliLoader(DaliCheckpoint):
    """The loader interface (docs/design.md) over the DALI pipelines of pipelines/dali.py, fed with tar
    members by `_BatchSource` instead of fn.readers.file; the graph after the reader is the same. Its resume
    state is DaliCheckpoint's, with where the pipeline's epochs start (a restarted epoch), the batches
    delivered and the shard set's identity."""

    def __init__(self, split, *, image_list: ShardList, batch_size, aug, rank, world_size, local_rank, seed,
                 device, dtype, placement, threads: int, prefetch: int, hw_decoder_load: float, fused_decode: bool):
        import torch

        from pipelines.dali import _require_dali, describe_decode, training_pipeline, validation_pipeline

        _require_dali()
        self._begin(split, aug, image_list)
        self._list = image_list
        self.class_counts = image_list.class_counts()
        self.num_samples, self.num_classes = len(image_list), len(image_list.classes)
        self.batch_size, self.device = batch_size, torch.device(device)
        self._host_batches = placement == "cpu"
        self._rank, self._world, self._seed = rank, world_size, seed
        self._threads = max(4, 2 * threads)  # reads wait on storage, not the CPU
        # self.position (EpochLoader): batches of the current epoch delivered (the step a StorageLost stops at)
        self._lost_at = None  # the pipeline's checkpoint at the last delivered batch, after a StorageLost
        self._offset, self._dali_epoch = 0, 0  # our epoch = offset + DALI's epoch index
        share = len(epoch_order(self.num_samples, rank, world_size, seed, 0, self.training))
        self._steps = share // batch_size if self.training else -(-share // batch_size)
        self._size = self._steps * batch_size if self.training else share
        self.decode = describe_decode(self.training, placement, fused_decode, hw_decoder_load) + \
            f"; bytes from tar members ({where(image_list)}, {self._threads} reading threads)"
        self._build_args = dict(batch_size=batch_size, num_threads=threads,
                                device_id=None if placement == "cpu" else local_rank, seed=seed * 1000 + rank,
                                prefetch_queue_depth=prefetch, enable_checkpointing=True,
                                enable_conditionals=self.training and aug.randaugment_magnitude > 0)
        define = training_pipeline if self.training else validation_pipeline
        options = {"hw_decoder_load": hw_decoder_load, **({"fused_decode": fused_decode} if self.training else {})}
        training = self.training
        self._define = lambda source, size: define(source, None, shard_id=rank, num_shards=world_size,
                                                   aug=replace(aug, image_size=size) if training else aug,
                                                   placement=placement, dtype=dtype, **options)
        self._build(checkpoint=None)

    def _build(self, checkpoint):
        import warnings

        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self._lost_at = None
        source = _BatchSource(self._list, rank=self._rank, world_size=self._world, seed=self._seed,
                              batch_size=self.batch_size, training=self.training, offset=self._offset,
                              threads=self._threads)
        define, size = self._define, self.image_size
        pipe = pipeline_def(lambda: define(source, size), **self._build_args, checkpoint=checkpoint)()
        with warnings.catch_warnings():  # DALI asks for reader_name; an external source has none: size is exact
            warnings.filterwarnings("ignore", message="Please set `reader_name`")
            self._iterator = DALIGenericIterator(
                [pipe], ["images", "labels"], size=self._size, auto_reset=True,
                last_batch_policy=LastBatchPolicy.DROP if self.training else LastBatchPolicy.PARTIAL)

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
            images = outputs[0]["images"].permute(0, 3, 1, 2)  # NHWC -> NCHW view: channels_last, no copy
            labels = outputs[0]["labels"].view(-1).long()
            if self._host_batches and images.device != self.device:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            self.position += 1
            yield images, labels
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
        self._check_identity(state)  # before anything of it is used
        self._offset, self._dali_epoch, self.position = state["offset"], state["dali_epoch"], state["position"]
        super().load_state_dict(state)


# ---------------------------------------------------------------------------------------------- torchvision


class ShardDataset:
    """torch Dataset over tar members: the baseline's JpegFolder with bytes from the store."""

    def __init__(self, image_list: ShardList, transform):
        self.list, self.transform = image_list, transform

    def __len__(self) -> int:
        return len(self.list)

    def __getitem__(self, index):
        from PIL import Image

        from pipelines.baseline import to_rgb

        with Image.open(io.BytesIO(self.list.read(index))) as image:
            return self.transform(to_rgb(image)), self.list.labels[index]


__all__ = ["ShardList", "StorageLost", "is_shards", "list_shard_split", "read_dataset"]
