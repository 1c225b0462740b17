"""Issue 40, 1: gradient accumulation's policies (rn50.core.accumulation): an epoch's optimizer steps, which micro-batch
of which step each loader batch is, where a checkpoint may fall, the step's loss; the LR's global batch; the resume
guard on accum_steps and clip_grad_norm. The step itself: tests/component/test_accumulation_and_clipping.py."""

from __future__ import annotations

import pytest
import torch

from rn50.config.errors import UserError
from rn50.config.recipe import Recipe, with_fields
from rn50.core.accumulation import checkpoint_step, in_steps, step_loss, steps_per_epoch
from rn50.reliability.lifecycle import guard_resume, schedule_changes


def test_an_epoch_has_whole_steps_and_drops_the_incomplete_last_group():
    assert steps_per_epoch(12, 1) == 12
    assert steps_per_epoch(12, 5) == 2  # 10 micro-batches train, the last 2 are dropped
    assert steps_per_epoch(12, 12) == 1
    with pytest.raises(UserError) as refused:
        steps_per_epoch(3, 4)
    message = str(refused.value)
    assert "\n" not in message and "--accum-steps 4" in message and "gives 3" in message and "lower" in message


class Counted:
    """A loader's batches, counting how many were read."""

    def __init__(self, n):
        self.n, self.read = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.read += 1
            yield f"b{i}"


def test_micro_batches_are_numbered_by_step_and_the_dropped_ones_are_still_read():
    batches = Counted(7)
    assert list(in_steps(batches, 3, 0, 2)) == [(0, 0, "b0"), (0, 1, "b1"), (0, 2, "b2"),
                                               (1, 0, "b3"), (1, 1, "b4"), (1, 2, "b5")]
    assert batches.read == 7  # the 7th, dropped, was read: the loader ends its epoch as a for loop would end it
    # a mid-epoch resume at step 1: the loader starts at that step's first micro-batch (its state says so)
    assert [(s, m) for s, m, _ in in_steps(Counted(4), 2, 1, 3)] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    # a loader that ends early ends the epoch early; the unfinished step's micro-batch was handed out, no step made
    assert [(s, m) for s, m, _ in in_steps(Counted(3), 2, 0, 2)] == [(0, 0), (0, 1), (1, 0)]


def test_checkpoints_fall_only_at_optimizer_step_boundaries():
    assert [checkpoint_step(d, 2, 5) for d in range(0, 12)] == [0, None, 1, None, 2, None, 3, None, 4, None, 5, 5]
    assert [checkpoint_step(d, 1, 4) for d in range(0, 5)] == [0, 1, 2, 3, 4]  # without accumulation: every batch


def test_the_steps_loss_is_the_mean_of_its_micro_batches_and_the_one_loss_itself_without_accumulation():
    one = torch.tensor(0.25)
    assert step_loss([one]) is one
    assert step_loss([torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.5)]).item() == 2.5


def test_the_global_batch_and_the_peak_lr_count_the_micro_batches():
    recipe = with_fields(batch_size=64, accum_steps=4)
    assert recipe.optimisation.global_batch(2) == 512
    assert recipe.optimisation.peak_lr(2) == pytest.approx(0.1 * 512 / 256)
    assert with_fields(batch_size=64).optimisation.peak_lr(2) == pytest.approx(0.1 * 128 / 256)


@pytest.mark.parametrize("fields, words", [({"accum_steps": 0}, "accum_steps must be at least 1, got 0"),
                                           ({"clip_grad_norm": -1.0}, "clip_grad_norm must be positive, or 0"),
                                           ({"clip_grad_norm": float("nan")}, "clip_grad_norm must be positive")])
def test_bad_values_are_one_line(fields, words):
    with pytest.raises(UserError) as refused:
        with_fields(**fields)
    assert "\n" not in str(refused.value) and words in str(refused.value)


def test_on_resume_accum_steps_is_refused_as_the_batch_size_is_and_clipping_may_change_with_one_line():
    saved = with_fields(Recipe(), epochs=2)
    with pytest.raises(UserError, match="--allow-change accum_steps"):  # another global batch: another stream
        guard_resume(saved, with_fields(saved, accum_steps=2), None)
    assert guard_resume(saved, with_fields(saved, accum_steps=2), "accum_steps") == ["accum_steps: 1 -> 2"]
    clipped = with_fields(saved, clip_grad_norm=1.0)
    assert guard_resume(saved, clipped, None) == []  # the resume stays exact
    assert schedule_changes(saved, clipped, epochs_done=1) == (
        "changed on resume: clip_grad_norm 0.0 -> 1.0 (the clipping of the steps to come; the steps done and the "
        "data stream stay as they were)")
    both = schedule_changes(saved, with_fields(clipped, base_lr=0.05), epochs_done=1)
    assert both.startswith("changed on resume: base_lr 0.1 -> 0.05, clip_grad_norm 0.0 -> 1.0 (the LR and the "
                           "clipping of the steps to come")
