"""Elastic world size (issue 27, item 3), the arithmetic: one permutation per epoch whatever the world size
(pipelines.order.GlobalOrder, DistributedSampler's order), and lifecycle.resume_point continuing an interrupted
epoch at another size so that every image of it is used once, but for a tail short of a global batch. The
real processes: tests/e2e/test_elastic.py."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DistributedSampler

from pipelines.order import GlobalOrder
from rn50.system.dist import DistEnv
from rn50.reliability.lifecycle import check_world_size, resume_point
from rn50.config.errors import UserError
from rn50.config.recipe import Recipe, with_fields


@pytest.mark.parametrize("size,world,batch", [(48, 2, 4), (50, 3, 4), (7, 2, 1), (1000, 4, 5)])
def test_a_whole_epoch_is_distributed_samplers_order(size, world, batch):
    for rank, epoch in itertools.product(range(world), (0, 3)):
        reference = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=7,
                                       drop_last=True)
        reference.set_epoch(epoch)
        ids = list(reference)
        order = GlobalOrder(size, rank, world, 7, batch)
        order.set_epoch(epoch)
        assert list(order) == ids[:len(ids) // batch * batch]


def _checkpoint(world, steps_per_epoch, epoch, offset, loader_state=None):
    state = loader_state or {"epoch": epoch, "position": offset}
    return {"world_size": world, "steps_per_epoch": steps_per_epoch, "epoch": epoch, "loader_kind": "torchvision",
            "step": epoch * steps_per_epoch + offset, "loader": [dict(state) for _ in range(world)],
            "epoch_losses": None}


def _trained(size, world, batch, epoch, start, first, until):
    """The images world's ranks take from step `first` to step `until` of the epoch, from slot `start`."""
    used = []
    for rank in range(world):
        order = GlobalOrder(size, rank, world, 3, batch)
        order.set_epoch(epoch)
        order.start = start
        used += list(order)[:(until - first) * batch]
    return used


@pytest.mark.parametrize("size,batch,worlds,stops", [
    (48, 4, (2, 1, 2), (2, 5)),  # the e2e test's shrink and grow
    (48, 4, (2, 3), (1,)),
    (100, 3, (4, 1, 3, 2), (3, 7, 2)),
    (52, 4, (1, 2), (1,)),  # the new group takes the whole rest from step 0: `first` 0, `start` 4
])
def test_an_interrupted_epoch_continues_over_another_world_each_image_once(size, batch, worlds, stops):
    recipe, epoch = with_fields(Recipe(), batch_size=batch), 1
    world, start, first, position = worlds[0], 0, 0, stops[0]
    used = _trained(size, world, batch, epoch, start, first, position)
    for new_world, stop in itertools.zip_longest(worlds[1:], stops[1:]):
        spe = size // new_world // batch
        state = {"epoch": epoch, "position": position, **({"start": start, "first": first} if start or first else {})}
        checkpoint = _checkpoint(world, size // world // batch, epoch, position, state)
        point = resume_point(checkpoint, recipe, recipe, "torchvision", DistEnv(0, new_world, 0, torch.device("cpu")),
                             spe, exact=True, train_images=size)
        loader = point.loader_state
        assert point.offset == loader["position"] == loader["first"] and "resharded from" in point.note
        world, start, first = new_world, loader["start"], loader["first"]
        position = spe if stop is None else first + stop
        assert position <= spe
        used += _trained(size, world, batch, epoch, start, first, position)
    assert len(used) == len(set(used)) and set(used) <= set(range(size))
    assert size - len(used) < batch * world  # only a tail short of the last group's global batch is left out


def test_the_dali_loaders_restart_the_epoch_and_a_plain_resume_needs_reshard(monkeypatch):
    recipe = Recipe()
    checkpoint = {**_checkpoint(2, 6, 1, 3), "loader_kind": "dali-cpu"}
    point = resume_point(checkpoint, recipe, recipe, "dali-cpu", DistEnv(0, 1, 0, torch.device("cpu")), 12,
                         exact=True, train_images=48)
    assert point.offset == 0 and point.loader_state is None and "the epoch restarts" in point.note
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(UserError, match="--reshard"):
        check_world_size(checkpoint, DistEnv(0, 1, 0, torch.device("cpu")), reshard=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # under torchrun: an elastic change
    check_world_size(checkpoint, DistEnv(0, 1, 0, torch.device("cpu")), reshard=False)


def test_reshards_help_says_what_a_resume_at_another_world_size_does():
    """Issue 38, 8: --reshard's help said "restarts the interrupted epoch" for every loader, while resume_point
    continues it with the elastic ones (as the docs said). The help now names, per loader kind, what
    resume_point does with it: continue (offset past the epoch's start) or restart (offset 0)."""
    from pipelines.registry import KINDS
    from rn50.config.run_settings import RESHARD_HELP

    head, _, tail = RESHARD_HELP.partition(" loaders continue ")
    continuing = {k.strip() for k in head.rsplit("the ", 1)[-1].split(",")} if tail else set()
    restarting = {k.strip() for k in tail.rpartition("changed), the ")[2].removesuffix(" loaders restart it")
                  .split(",")} if tail else set()
    recipe = with_fields(Recipe(), batch_size=4)
    for kind in KINDS:
        checkpoint = {**_checkpoint(2, 6, 1, 3), "loader_kind": kind}  # 2 processes, 3 steps into epoch 2
        point = resume_point(checkpoint, recipe, recipe, kind, DistEnv(0, 1, 0, torch.device("cpu")), 12,
                             exact=True, train_images=48)
        continued = point.offset > 0
        assert (kind in continuing) == continued and (kind in restarting) != continued, (kind, point.note,
                                                                                         RESHARD_HELP)
