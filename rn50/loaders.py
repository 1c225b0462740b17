"""The recipe's loaders: how training and the benchmark harness ask `pipelines.build_loader` for data.

The only place that turns recipe fields into loader options, so the harness measures exactly the input
pipeline that training runs, in the dtype the training step computes in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines import build_loader
from rn50.dist import DistEnv
from rn50.precision import autocast_dtype, batch_dtype
from rn50.recipe import Recipe


def loader_options(recipe: Recipe, device: torch.device) -> dict:
    return dict(
        dtype=batch_dtype(autocast_dtype(recipe.amp, recipe.amp_dtype, device)),
        dali_threads=recipe.dali_threads, hw_decoder_load=recipe.hw_decoder_load,
        fused_decode=recipe.fused_decode, color_jitter=recipe.color_jitter, prefetch=recipe.prefetch,
        workers=recipe.workers, resize_ratio=recipe.val_resize_ratio,
        randaugment_magnitude=recipe.randaugment_magnitude, randaugment_layers=recipe.randaugment_layers,
        randaugment_magnitude_std=recipe.randaugment_magnitude_std, repeated_aug=recipe.repeated_aug,
    )


def build_split(recipe: Recipe, kind: str, split: str, data: Path | None, env: DistEnv, manifest: Path | None = None,
                **overrides):
    """One split's loader for this rank, as the recipe asks; `overrides` replace single options."""
    options = {**loader_options(recipe, env.device), **overrides}
    return build_loader(kind, split, data, batch_size=recipe.batch_size, image_size=recipe.image_size,
                        rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, seed=recipe.seed,
                        device=env.device, manifest=manifest, **options)


def build_loaders(recipe: Recipe, data: Path, env: DistEnv, manifest: Path | None = None):
    """The training and validation loaders of a run."""
    return (build_split(recipe, recipe.loader, "train", data, env, manifest),
            build_split(recipe, recipe.loader, "val", data, env, manifest))
