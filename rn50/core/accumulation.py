"""Gradient accumulation (`--accum-steps K`): K micro-batches of --batch-size per optimizer step, as pure policies.

The training step (rn50.core.step.train_step) takes one micro-batch at a time and its place in the step, so one
micro-batch is in memory at a time, as without accumulation; these functions say which micro-batch of which
optimizer step each loader batch is, how many optimizer steps an epoch has, and where a checkpoint may fall.
Everything that counts steps (the LR schedule and its warm-up, the step lines, --checkpoint-every, the stop
checks, --profile-steps, checkpoints' `step` and `steps_per_epoch`) counts optimizer steps.

An epoch whose batch count is not a multiple of K drops its last `batches % K` micro-batches, as the loaders
drop a last partial batch: every optimizer step then has the same global batch (the loss divided by K means the
same thing in each), and every epoch has the same number of steps, which the LR schedule (a function of the
fractional epoch, steps / steps_per_epoch) and a mid-epoch resume rely on. The dropped batches are still read
(and discarded): a loader stopped before its epoch's end would start the next epoch with them.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from rn50.config.errors import UserError


def steps_per_epoch(batches: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of `batches` micro-batches (this rank's loader length): whole groups of K."""
    steps = batches // accum_steps
    if steps < 1:
        raise UserError(f"--accum-steps {accum_steps} needs {accum_steps} batches per epoch on each process, but "
                        f"the training data gives {batches}; lower --accum-steps or --batch-size")
    return steps


def in_steps(batches: Iterable, accum_steps: int, first: int, last: int) -> Iterator[tuple[int, int, object]]:
    """(step, micro, batch) for each batch of steps first..last - 1 of an epoch (0-based, `first` > 0 when
    resuming mid-epoch, the loader then starting at batch first * K), `micro` its place in its step; the batches
    after the last whole step are read and dropped (see the module's docstring)."""
    batches = iter(batches)
    for step in range(first, last):
        for micro in range(accum_steps):
            batch = next(batches, None)
            if batch is None:  # the epoch ends early, as a plain for loop over the loader would; the micro-batches
                return  # of an unfinished step are dropped with their gradients (the next step's first zeroes them)
            yield step, micro, batch
    for _ in batches:
        pass


def step_loss(losses: list[torch.Tensor]) -> torch.Tensor:
    """The optimizer step's loss from its micro-batches' (each the mean over its images): their mean, the loss
    of the step's whole batch; the one loss itself without accumulation (no extra kernel)."""
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def checkpoint_step(delivered: int, accum_steps: int, last: int) -> int | None:
    """The epoch's optimizer steps done when its loader has delivered `delivered` micro-batches and the run must
    stop there (the data source failed), for a checkpoint at that point; None between two micro-batches of a
    step. Checkpoints fall only at optimizer-step boundaries: saving a half-accumulated gradient would mean a
    model-sized tensor per rank in the checkpoint, and on several ranks the gradients of the micro-batches so
    far were never all-reduced (DDP's no_sync), so no rank holds the step's gradient. Stop signals and
    --checkpoint-every are checked after each optimizer step, which comes within K micro-batches. Past the
    epoch's last step (reading the dropped batches at its end) every step of the epoch is done."""
    if delivered >= last * accum_steps:
        return last
    return delivered // accum_steps if delivered % accum_steps == 0 else None
