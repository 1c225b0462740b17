"""The learning rate as a pure function of (recipe, step): linear warmup from 0, then step decay."""

from __future__ import annotations

from rn50.recipe import Recipe


def lr_at(recipe: Recipe, step: int, steps_per_epoch: int, world_size: int) -> float:
    """LR for optimizer step `step` (0-based, counted over the whole run).

    Updated every step, not every epoch: the warmup is a ramp over 5 * steps_per_epoch steps
    (step 0 has LR 0), and a milestone at epoch 30 takes effect at exactly step 30 * steps_per_epoch.
    """
    peak = recipe.peak_lr(world_size)
    epoch = step / steps_per_epoch  # fractional epoch
    if epoch < recipe.warmup_epochs:
        return peak * epoch / recipe.warmup_epochs
    passed = sum(1 for milestone in recipe.lr_milestones if epoch >= milestone)
    return peak * recipe.lr_decay**passed


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
