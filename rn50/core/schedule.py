"""The learning rate as a pure function of (schedule, peak LR, step): linear warmup from warmup_start_factor x
the peak (0 by default; torchvision's --lr-warmup-decay), then step decay,
cosine, or linear down to 0 at the last epoch (FFCV's "cyclic" schedule: up, then straight down).

The plateau schedule is the one exception: it scales this function by a multiplier that
ReduceLROnPlateau derives from the validation loss (see PlateauMultiplier). The schedules' names are
rn50.config.choices.SCHEDULES.
"""

from __future__ import annotations

import math

import torch

from rn50.config.recipe import Schedule


def lr_at(schedule: Schedule, peak: float, step: int, steps_per_epoch: int) -> float:
    """LR for optimizer step `step` (0-based, counted over the whole run); `peak` is
    Optimisation.peak_lr(world_size).

    Updated every step, not every epoch: the warmup is a ramp over warmup_epochs * steps_per_epoch steps
    from warmup_start_factor * peak at step 0 (torchvision's LinearLR from --lr-warmup-decay; 0 by default), and
    a milestone at epoch 30 takes effect at exactly step 30 * steps_per_epoch.
    """
    s = schedule
    epoch = step / steps_per_epoch  # fractional epoch
    if epoch < s.warmup_epochs:
        start = s.warmup_start_factor
        return peak * (start + (1 - start) * epoch / s.warmup_epochs)
    if s.kind == "cosine":
        # cosine from the peak to min_lr over the epochs between warmup and cooldown, then min_lr
        span = s.epochs - s.cooldown_epochs - s.warmup_epochs
        progress = min(1.0, (epoch - s.warmup_epochs) / span)
        return s.min_lr + 0.5 * (peak - s.min_lr) * (1 + math.cos(math.pi * progress))
    if s.kind == "plateau":
        return peak
    if s.kind == "linear":
        return peak * max(0.0, (s.epochs - epoch) / (s.epochs - s.warmup_epochs))
    passed = sum(1 for milestone in s.lr_milestones if epoch >= milestone)
    return peak * s.lr_decay**passed


def peak_reached(schedule: Schedule, peak: float, steps_per_epoch: int) -> float:
    """The highest LR that lr_at gives over the run's steps: `peak`, unless the warm-up outlasts the run (then
    the last step's LR). lr_at rises through the warm-up and never rises after it, so the highest is at the
    warm-up's last step or the first step after it, whichever the run reaches (the plateau multiplier only
    lowers it)."""
    last = schedule.epochs * steps_per_epoch - 1
    after_warmup = math.ceil(schedule.warmup_epochs * steps_per_epoch)  # the first step past the warm-up
    return max(lr_at(schedule, peak, min(max(step, 0), last), steps_per_epoch)
               for step in (after_warmup - 1, after_warmup))


def set_lr(optimizer, lr: float, frozen: bool = False) -> None:
    """`frozen`: the backbone's groups get LR 0 (fine-tuning trains only the classifier at first; a zero
    LR rather than requires_grad=False, which DDP does not allow to change after wrapping)."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if frozen and not group.get("head") else lr


class PlateauMultiplier:
    """torch's ReduceLROnPlateau logic (patience, threshold) driving a multiplier of lr_at, stepped once
    per validation. It runs on a one-parameter stand-in optimizer, so it never fights set_lr."""

    def __init__(self, schedule: Schedule):
        self._schedule = schedule
        self._optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self._scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._optimizer, mode="min", factor=schedule.plateau_factor, patience=schedule.plateau_patience)

    @property
    def value(self) -> float:
        return self._optimizer.param_groups[0]["lr"]

    def step(self, val_loss: float) -> None:
        self._scheduler.step(val_loss)

    def state_dict(self) -> dict:
        return {"scheduler": self._scheduler.state_dict(), "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self._scheduler.load_state_dict(state["scheduler"])
        self._optimizer.param_groups[0]["lr"] = state["value"]
        # the saved state holds the factor and patience it ran with: a resume that changed them uses the new ones
        self._scheduler.factor = self._schedule.plateau_factor
        self._scheduler.patience = self._schedule.plateau_patience
