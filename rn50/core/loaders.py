"""The recipe's loaders: how training and the benchmark harness ask `pipelines.build_loader` for data.

The only place that turns recipe fields and machine settings into build_loader's arguments (the
augmentation spec, the batch dtype, a LoaderSettings), so the harness measures exactly the input pipeline
that training runs, in the dtype the training step computes in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines import REGISTRY, build_loader, list_data
from pipelines.registry import concrete_kind
from rn50.system.dist import DistEnv
from rn50.core.precision import autocast_dtype, batch_dtype
from rn50.config.machine import Machine
from rn50.config.recipe import Recipe


def loader_options(recipe: Recipe, machine: Machine, device: torch.device) -> dict:
    """What build_loader takes besides the split and the sizes: the augmentation spec, the batch dtype the
    training step computes in, and this machine's LoaderSettings."""
    return dict(
        augmentation=recipe.augmentation,
        dtype=batch_dtype(autocast_dtype(recipe.precision.amp, recipe.precision.amp_dtype, device)),
        settings=machine.loader_settings(),
    )


def build_split(recipe: Recipe, machine: Machine, kind: str, split: str, data: Path | None, env: DistEnv,
                manifest: Path | None = None, **overrides):
    """One split's loader for this rank, as the recipe asks. `overrides`: build_loader's own arguments
    (preflight="split") or single loader settings replacing the machine's (dali_threads=2: the autotune sweep)."""
    options = {**loader_options(recipe, machine, env.device), **overrides}
    kind = concrete_kind(kind, env.device.type)  # `auto`: dali on CUDA, dali-cpu without it (the registry's)
    return build_loader(kind, split, data, batch_size=recipe.optimisation.batch_size,
                        image_size=recipe.augmentation.image_size, rank=env.rank, world_size=env.world_size,
                        local_rank=env.local_rank, seed=recipe.seed, device=env.device, manifest=manifest,
                        **options)


def data_identity(data: Path | None, manifest: Path | None, kind: str) -> dict | None:
    """The training list a run reads, as checkpoints record it: {"count": samples, "digest": 16 hex digits}
    (pipelines.Listing.identity: class folders, a manifest or shards); None where the kind reads no images
    (synthetic) or there is no data. The listing is the loaders' own, cached: building them afterwards lists
    nothing again."""
    if data is None or not REGISTRY[concrete_kind(kind, "cpu")].reads_images:  # auto reads images anywhere
        return None
    return list_data(data, "train", manifest).identity


def build_loaders(recipe: Recipe, machine: Machine, data: Path, env: DistEnv, manifest: Path | None = None):
    """The training and validation loaders of a run."""
    return (build_split(recipe, machine, machine.loader, "train", data, env, manifest),
            build_split(recipe, machine, machine.loader, "val", data, env, manifest))
