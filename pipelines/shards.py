"""ImageNet as WebDataset tar shards (`python -m tools.shard` writes them): the format and the listing.

The design (docs/data.md says why): a shard folder is turned into the same kind of image list the folder
path uses, an ordered list of samples with labels, where a sample is a tar member (shard, byte offset,
size) instead of a file. Every loader keeps its sampler: which image goes to which rank and step is a
function of (seed, epoch, rank, world size) exactly as for folders, so equal steps per rank, every
validation image counted once, and bit-identical mid-epoch resume carry over unchanged; only the source of
the bytes differs (pipelines.storage: local or network file system, or S3). What reads them: the DALI
loader over an external source (pipelines.dali_shards) and the torchvision loaders' datasets (pipelines.torchvision_loader,
pipelines.torchvision_gpu).

Layout of a shard folder (or s3://bucket/prefix):

    dataset.json                 format, classes (index = label), per split: count, class counts,
                                 shards [{name, index, count, size, sha256}], members table, left-out files
    <split>-NNNNNN.tar           WebDataset shards: per sample `KEY.<ext>` (the image's bytes, untouched)
                                 and `KEY.cls` (its class index as text); written in a global shuffle
    <split>-NNNNNN.idx           DALI's wds2idx index of that shard (fn.readers.webdataset reads it)
    <split>-members.npy          int64 [N, 4]: shard number, byte offset, size, label, in shard order: the
                                 whole split's member offsets in one read (not one per shard)

The data identity of a split is a digest of its dataset.json entry (every shard's sha256 and size, and the
members table's): checkpoints record it (pipelines.listing.Listing.identity), and a resume on other shards is
refused at start-up, as one on other class folders is (rn50.reliability.lifecycle.check_data).
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import UserError
from pipelines.storage import StorageLost, is_s3, normalise, open_store

FORMAT = "rn50-shards/1"
DATASET_JSON = "dataset.json"
COLUMNS = ("shard", "offset", "size", "label")  # of the members table

if TYPE_CHECKING:
    import numpy as np  # imported where used: `import pipelines` stays light (rn50.train reads flags first)


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
        import numpy as np

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
    import numpy as np

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


def describe_source(image_list, threads: int | None = None) -> str:
    """What a loader's decode line adds when it reads shards: "; bytes from tar members (S3, 8 reading
    threads)"; nothing for class folders."""
    if not isinstance(image_list, ShardList):
        return ""
    where = "S3" if is_s3(image_list.location) else "local shards"
    return f"; bytes from tar members ({where}{'' if threads is None else f', {threads} reading threads'})"


__all__ = ["ShardList", "StorageLost", "classes_of", "describe_source", "epoch_order", "is_shards",
           "list_shard_split", "read_dataset", "split_identity"]


