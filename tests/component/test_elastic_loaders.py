"""Elastic world size (issue 27, item 3) through the real sampler-driven loaders on the CPU: two ranks train
part of an epoch, the state that lifecycle.resume_point makes for one rank (and for three) continues it, and
the images each rank's loader delivered (RN50_SAMPLE_LOG) cover the epoch once, the batches of the rest
numbered to end at the epoch's usual step."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines import build_loader
from pipelines.registry import kinds
from rn50.system.dist import DistEnv
from rn50.reliability.lifecycle import resume_point
from rn50.config.recipe import Recipe, with_fields

BATCH = 4


@pytest.mark.parametrize("kind", kinds(elastic=True, reads_images=True))  # what the registry calls elastic
@pytest.mark.parametrize("new_world", [1, 3])
def test_the_rest_of_an_epoch_goes_to_the_new_world(kind, new_world, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RN50_SAMPLE_LOG", str(tmp_path))

    def loader(rank, world):
        return build_loader(kind, "train", data_dir, batch_size=BATCH, image_size=32, rank=rank, world_size=world,
                            seed=5, preflight=False, workers=0 if kind == "torchvision" else 1)

    old = [loader(rank, 2) for rank in range(2)]
    size, done = old[0].num_samples, 2
    for each in old:
        each.set_epoch(1)
        for _ in zip(range(done), each):
            pass
    recipe = with_fields(Recipe(), batch_size=BATCH)
    checkpoint = {"world_size": 2, "steps_per_epoch": len(old[0]), "epoch": 1, "loader_kind": kind,
                  "step": len(old[0]) + done, "loader": [each.state_dict() for each in old], "epoch_losses": None}
    assert checkpoint["loader"][0]["position"] == done
    new = [loader(rank, new_world) for rank in range(new_world)]
    steps = len(new[0])
    point = resume_point(checkpoint, recipe, recipe, kind, DistEnv(0, new_world, 0, torch.device("cpu")), steps,
                         exact=True, train_images=size)
    rest = 0
    for each in new:
        each.load_state_dict(point.loader_state)
        assert len(each) == steps  # the epoch's steps as ever: the segment is numbered from `first`
        rest = sum(1 for _ in each)
        assert each.position == 0  # the epoch ended at its usual step
    assert point.offset + rest == steps
    ids = [i for path in tmp_path.glob("rank*.jsonl") for line in path.read_text().splitlines()
           for i in json.loads(line)["ids"]]
    assert len(ids) == len(set(ids)) == size - (size - done * BATCH * 2) % (BATCH * new_world)
