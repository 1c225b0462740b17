"""The replica check behind summary["ddp/replicas_identical"]: rn50.core.step.state_digest sees a change of one
ulp in one weight and a change in a BN buffer, and rn50.core.step.replicas_identical says False on every rank
when one rank's weights differ (two real gloo processes), True when none do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rn50.core.step import replicas_identical, state_digest


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_state_digest_is_equal_for_equal_models_and_sees_one_ulp():
    a, b = tiny_model(), tiny_model()
    assert state_digest(a) == state_digest(b)  # same seed, bit-identical: the same digest
    before = state_digest(b)
    with torch.no_grad():
        weight = b[0].weight
        nudged = torch.nextafter(weight[0, 0, 0, 0], torch.tensor(float("inf")))
        assert nudged != weight[0, 0, 0, 0] and (nudged - weight[0, 0, 0, 0]).abs() < 1e-6  # one ulp
        weight[0, 0, 0, 0] = nudged
    assert state_digest(b) != before
    assert state_digest(b) == state_digest(b)  # deterministic, and reading it changes nothing


def test_state_digest_sees_buffers():
    model = tiny_model()
    before = state_digest(model)
    model[1].running_mean[2] += 1e-3  # BN running statistics are state too: they change the eval output
    assert state_digest(model) != before
    model = tiny_model()
    model[1].num_batches_tracked += 1  # an integer buffer
    assert state_digest(model) != before


def test_replicas_identical_in_one_process_is_true():
    assert not dist.is_initialized()
    assert replicas_identical(tiny_model()) is True


def _replica_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        model = tiny_model(seed=0)  # the same initial weights on every rank, as build_training makes them
        results["nobody_perturbs"] = replicas_identical(model)
        with torch.no_grad():
            if rank == 1:  # one weight element on one rank, by one ulp
                w = model[0].weight
                w[0, 0, 0, 0] = torch.nextafter(w[0, 0, 0, 0], torch.tensor(float("inf")))
        results["rank1_perturbs_a_weight"] = replicas_identical(model)
        model = tiny_model(seed=0)
        if rank == 0:
            model[1].running_mean[0] += 0.5  # BN statistics drifted on rank 0 alone
        results["rank0_perturbs_a_buffer"] = replicas_identical(model)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_replicas_identical_over_two_gloo_processes(tmp_path):
    mp.spawn(_replica_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, result in enumerate(results):
        assert result == {"nobody_perturbs": True, "rank1_perturbs_a_weight": False,
                          "rank0_perturbs_a_buffer": False}, (rank, result)
