"""`--data` as one split's list of samples: class folders (pipelines.folder) or shards (pipelines.shards),
and the data identity a checkpoint records.

The one listing function: build_loader lists through it, and so does the run's data check
(rn50.core.loaders.data_identity, read by rn50.reliability.lifecycle.check_data). Both listings are cached per
process (pipelines.folder.list_split, pipelines.shards.list_shard_split), so the loaders built after the check
list nothing again, and `list_split.cache_clear()` is seen here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import UserError
from pipelines.folder import ImageList, list_split
from pipelines.shards import ShardList, is_shards, list_shard_split


@dataclass(frozen=True)
class Listing:
    """One split of --data as listed: `images`, what every loader reads (an ImageList of class folders or a
    manifest, a ShardList of a shard set), its class names, labels and class counts."""

    images: ImageList | ShardList

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shards(self) -> bool:
        return isinstance(self.images, ShardList)

    @property
    def identity(self) -> dict:
        """The list as checkpoints record it: {"count": samples, "digest": 16 hex digits}, ImageList.identity
        for class folders and manifests, the split's shard identity (pipelines.shards.split_identity) for shards.
        A resume on another list is refused by the run (rn50.reliability.lifecycle.check_data), the one check."""
        return {"count": len(self.images), "digest": self.images.identity}


def list_data(data, split: str, manifest=None) -> Listing | None:
    """One split of `data` (a class-folder dataset, a tools.shard folder or s3://bucket/prefix), listed and
    checked; with `manifest` (a tools.scan folder, class folders only) the files it lists. None without data
    (synthetic batches)."""
    if data is None:
        return None
    if is_shards(data):
        if manifest is not None:
            raise UserError("--manifest lists files of class folders; with shards, shard from it instead "
                            "(`python -m tools.shard SRC --manifest SCAN --out DST`) and drop --manifest")
        return Listing(list_shard_split(str(data), split))
    return Listing(list_split(str(data), split, None if manifest is None else str(manifest)))
