"""The recipe's loaders: how training and the benchmark harness ask `pipelines.build_loader` for data.

The only place that turns recipe fields and machine settings into build_loader's arguments (the
augmentation spec, the batch dtype, a LoaderSettings), so the harness measures exactly the input pipeline
that training runs, in the dtype the training step computes in.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from pipelines import LoaderSettings, build_loader
from rn50.system.dist import DistEnv
from rn50.core.precision import autocast_dtype, batch_dtype
from rn50.config.machine import Machine, concrete_loader
from rn50.config.recipe import Recipe


def loader_settings(machine: Machine) -> LoaderSettings:
    """This machine's loader settings: the Machine's fields of the same names (dali_threads, hw_decoder_load,
    fused_decode, prefetch, workers)."""
    return LoaderSettings(**{f.name: getattr(machine, f.name) for f in fields(LoaderSettings)})


def loader_options(recipe: Recipe, machine: Machine, device: torch.device) -> dict:
    """What build_loader takes besides the split and the sizes: the augmentation spec, the batch dtype the
    training step computes in, and this machine's LoaderSettings."""
    return dict(
        augmentation=recipe.augmentation,
        dtype=batch_dtype(autocast_dtype(recipe.precision.amp, recipe.precision.amp_dtype, device)),
        settings=loader_settings(machine),
    )


def build_split(recipe: Recipe, machine: Machine, kind: str, split: str, data: Path | None, env: DistEnv,
                manifest: Path | None = None, **overrides):
    """One split's loader for this rank, as the recipe asks. `overrides`: build_loader's own arguments
    (preflight="split") or single loader settings replacing the machine's (dali_threads=2: the autotune sweep)."""
    options = {**loader_options(recipe, machine, env.device), **overrides}
    kind = concrete_loader(kind, env.device.type)  # `auto`: dali on CUDA, dali-cpu without it
    return build_loader(kind, split, data, batch_size=recipe.optimisation.batch_size,
                        image_size=recipe.augmentation.image_size, rank=env.rank, world_size=env.world_size,
                        local_rank=env.local_rank, seed=recipe.seed, device=env.device, manifest=manifest,
                        **options)


def data_identity(data: Path | None, manifest: Path | None, kind: str) -> dict | None:
    """The training file list a run reads, as checkpoints record it: {"count": files, "digest": 16 hex digits}
    (ImageList.identity for class folders and manifests, the shard set's identity for shards); None for
    synthetic data. The listing is the loaders' own, cached: building them afterwards lists nothing again."""
    if kind == "synthetic" or data is None:
        return None
    from pipelines.folder import list_split
    from pipelines.shards import is_shards, list_shard_split

    files = list_shard_split(str(data), "train") if is_shards(data) else \
        list_split(str(data), "train", None if manifest is None else str(manifest))
    return {"count": len(files), "digest": files.identity}


def build_loaders(recipe: Recipe, machine: Machine, data: Path, env: DistEnv, manifest: Path | None = None):
    """The training and validation loaders of a run."""
    return (build_split(recipe, machine, machine.loader, "train", data, env, manifest),
            build_split(recipe, machine, machine.loader, "val", data, env, manifest))
