"""Issue 40, 1 and 2: gradient accumulation (--accum-steps) and clipping (--clip-grad-norm) in the one training step
(rn50.core.step.train_step): K micro-batches of B give the step of one batch of K x B (alone, under GradScaler, and
under DDP over two real gloo processes, where only the last micro-batch all-reduces), clipping bounds the applied
update and works on unscaled gradients, a stop signal between two micro-batches resumes bit for bit, and an
elastic resume continues an accumulating epoch. Clipping inside --cuda-graphs' capture without a host sync:
tests/component/test_graphs.py (CAPTURED_RECIPES)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import rn50.train
from pipelines import build_loader
from rn50.config.recipe import Recipe, with_fields
from rn50.core.accumulation import in_steps
from rn50.core.schedule import set_lr
from rn50.core.step import build_training, state_digest, train_step
from rn50.reliability.checkpoint import load_checkpoint, regular_checkpoints
from rn50.reliability.exits import EXIT_PREEMPTED
from rn50.reliability.lifecycle import resume_point
from rn50.system.dist import DistEnv
from test_graphs import as_on_a_gpu
from test_profiling import annotations

from conftest import CLASSES

CPU = DistEnv(0, 1, 0, torch.device("cpu"))

# K=2 micro-batches of B against one batch of 2B, from the same weights, BN in eval mode (its statistics would
# otherwise be those of each micro-batch): mathematically the same gradient, computed as two sums of B terms
# added (each scaled by 1/2) instead of one sum of 2B terms, so apart by float32 rounding alone. Measured over 10
# seeds (1 and 2 threads, with and without clipping, and under GradScaler): at most 1.2e-7 relative (L2 over each
# parameter's gradient), one float32 ulp (1.19e-7); 8.6e-8 over two gloo ranks. 1e-5 allows for other CPUs'
# kernels (other blockings) and still sees any real fault: a loss not divided by K (100%), a micro-batch lost to a
# zero_grad or a step in the middle (measured: a step on one micro-batch alone is up to 250% off).
GRAD_TOL = 1e-5
# the weights after the step (w - lr x the update), with the gradients above: measured at most 3e-8 apart in one
# process, 7.5e-9 over two ranks (weights up to ~0.5, whose ulp is 6e-8); 1e-6 is far below what a lost
# micro-batch changes (measured up to 4e-2 at lr 0.1)
WEIGHT_TOL = 1e-6
# an update's L2 norm against lr x the clipping threshold: measured 1.2e-5 to 1.5e-5 relative over 5 seeds (the
# update read back as w_after - w_before, in float32 beside weights ~1e4 times larger than its elements); 1e-3
# still tells apart a norm off by 65536 (clipping the scaled gradients) or a norm left unclipped (~200x here)
NORM_TOL = 1e-3


def batch(n: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last),
            torch.randint(0, CLASSES, (n,), generator=generator))


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return (torch.linalg.vector_norm((got - want).double()) / torch.linalg.vector_norm(want.double())).item()


def grad_norm(model) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()
                                                 if p.grad is not None])).item()


def accumulated_and_whole(fields: dict, seed: int = 0, parts=build_training):
    """One step of K=2 micro-batches of 4 and one of a batch of 8, same weights and images, BN in eval mode."""
    images, labels = batch(8, seed)
    accumulated = parts({"arch": "resnet18", "batch_size": 4, "accum_steps": 2, "seed": seed, **fields})
    whole = parts({"arch": "resnet18", "batch_size": 8, "seed": seed, **fields})
    for each in (accumulated, whole):
        each.model.eval()
        set_lr(each.optimizer, 0.1)
    train_step(accumulated, images[:4], labels[:4], 0)
    train_step(accumulated, images[4:], labels[4:], 1)
    train_step(whole, images, labels)
    return accumulated, whole


def on_the_cpu(fields: dict):
    return build_training(with_fields(**fields), CLASSES, CPU)


def assert_same_step(accumulated, whole):
    pairs = list(zip(accumulated.raw_model.parameters(), whole.raw_model.parameters()))
    worst = max(relative(a.grad, w.grad) for a, w in pairs if w.grad is not None)
    assert worst <= GRAD_TOL, worst
    for a, w in pairs:
        torch.testing.assert_close(a, w, rtol=0, atol=WEIGHT_TOL)


@pytest.mark.parametrize("fields", [{}, {"clip_grad_norm": 0.2, "ema_decay": 0.9}])
def test_two_micro_batches_of_b_make_the_step_of_one_batch_of_2b(fields):
    """SGD with Nesterov momentum and weight decay (the default recipe). With clipping: once, on the accumulated
    gradient (norm 0.64 unclipped; clipping each micro-batch's share would give another gradient), and the EMA
    updated once per step."""
    accumulated, whole = accumulated_and_whole(fields, parts=on_the_cpu)
    assert_same_step(accumulated, whole)
    if fields:
        # clipped: clip_grad_norm_ scales by 0.2 / (norm + 1e-6), measured 1.7e-6 below 0.2
        assert grad_norm(whole.raw_model) == pytest.approx(0.2, rel=1e-5)
        assert accumulated.ema.n_averaged == whole.ema.n_averaged == 1
        for a, w in zip(accumulated.ema.module.parameters(), whole.ema.module.parameters()):
            torch.testing.assert_close(a, w, rtol=0, atol=WEIGHT_TOL)


def test_under_gradscaler_the_scale_is_applied_and_updated_once_per_optimizer_step():
    """The GPU's fp16 path on the CPU (as_on_a_gpu: fused SGD, GradScaler("cpu") enabled by hand, fp32 compute):
    the accumulated step is the whole batch's step, and the scale's growth counter moved once, not per
    micro-batch. The scale is a power of two, so scaling and unscaling add no rounding."""
    def scaled(fields):  # as_on_a_gpu builds resnet18 (the batch size builds nothing)
        parts = as_on_a_gpu({**{k: v for k, v in fields.items() if k not in ("arch", "batch_size")}, "amp": False})
        parts.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        return parts

    accumulated, whole = accumulated_and_whole({"clip_grad_norm": 0.2}, parts=scaled)
    assert_same_step(accumulated, whole)
    assert accumulated.scaler._growth_tracker.item() == whole.scaler._growth_tracker.item() == 1


def test_clipping_bounds_the_update_to_the_norm_asked_for():
    """Plain SGD (no momentum, no decay): the update is lr x the gradient, so its norm is lr x the clipped norm,
    in the unclipped gradient's direction; the unclipped step's is larger."""
    fields = {"arch": "resnet18", "batch_size": 8, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
    images, labels = batch(8, 1)
    steps = {}
    for clip in (0.0, 0.05):
        parts = on_the_cpu({**fields, "clip_grad_norm": clip})
        before = torch.cat([p.detach().reshape(-1).clone() for p in parts.raw_model.parameters()])
        set_lr(parts.optimizer, 0.1)
        train_step(parts, images, labels)
        steps[clip] = torch.cat([p.detach().reshape(-1) for p in parts.raw_model.parameters()]) - before
    assert torch.linalg.vector_norm(steps[0.0]).item() > 10 * 0.1 * 0.05  # the clipping really bit
    assert torch.linalg.vector_norm(steps[0.05]).item() == pytest.approx(0.1 * 0.05, rel=NORM_TOL)
    assert torch.nn.functional.cosine_similarity(steps[0.05], steps[0.0], dim=0).item() > 0.999


def test_clipping_under_gradscaler_clips_the_unscaled_gradients():
    """fp16's path (fused SGD, an enabled GradScaler at 2^16) and the fp32 one clip alike: the threshold applies to
    the true gradients. Clipping the scaled ones (no unscale_ first) would shrink the update 65536 times."""
    fields = {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "clip_grad_norm": 0.05}
    scaled = as_on_a_gpu({**fields, "amp": False})  # resnet18
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    plain = on_the_cpu({"arch": "resnet18", **fields})
    images, labels = batch(8, 2)
    updates = []
    for parts in (scaled, plain):
        before = [p.detach().clone() for p in parts.raw_model.parameters()]
        set_lr(parts.optimizer, 0.1)
        train_step(parts, images, labels)
        updates.append(torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(parts.raw_model.parameters(), before)]))
    assert scaled.scaler.get_scale() == 2.0 ** 16  # no overflow: the step was taken
    assert torch.linalg.vector_norm(updates[0]).item() == pytest.approx(0.1 * 0.05, rel=NORM_TOL)
    # the fused kernel and the for-each one: the same update to a few ulps (tests/unit/test_fused_optimizer.py);
    # measured bit-identical here over 5 seeds
    torch.testing.assert_close(updates[0], updates[1], rtol=0, atol=WEIGHT_TOL)


# --- DDP over two gloo processes ---------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        env = DistEnv(rank, world, 0, torch.device("cpu"))
        images, labels = batch(8, seed=10 + rank)  # each rank its own images
        accumulated = build_training(with_fields(arch="resnet18", batch_size=4, accum_steps=2), CLASSES, env)
        whole = build_training(with_fields(arch="resnet18", batch_size=8), CLASSES, env)
        calls = []

        def counting(state, bucket):  # DDP's all-reduce, counted: it runs once per gradient bucket it reduces
            calls.append(bucket.index())
            return default_hooks.allreduce_hook(state, bucket)

        accumulated.model.register_comm_hook(None, counting)
        for parts in (accumulated, whole):
            parts.model.eval()
            set_lr(parts.optimizer, 0.1)
        train_step(accumulated, images[:4], labels[:4], 0)
        after_first = len(calls)
        train_step(accumulated, images[4:], labels[4:], 1)
        train_step(whole, images, labels)
        pairs = list(zip(accumulated.raw_model.parameters(), whole.raw_model.parameters()))
        result = {"after_first": after_first, "after_last": len(calls),
                  "grad": max(relative(a.grad, w.grad) for a, w in pairs if w.grad is not None),
                  "weight": max((a - w).abs().max().item() for a, w in pairs),
                  "digest": state_digest(accumulated.raw_model)}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_all_reduces_only_the_last_micro_batch_and_matches_one_batch_of_2b(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["after_first"] == 0, result  # no_sync: the first micro-batch's backward reduced nothing
        assert result["after_last"] > 0, result  # the last one reduced every bucket
        # the same tolerances as one process: the all-reduce adds the two ranks' sums in one order both ways
        assert result["grad"] <= GRAD_TOL and result["weight"] <= WEIGHT_TOL, result
    assert results[0]["digest"] == results[1]["digest"]  # the ranks hold bit-identical weights


# --- resume -------------------------------------------------------------------------------------------------

SMALL = ["--loader", "dali-cpu", "--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--dali-threads",
         "1", "--warmup-epochs", "1", "--lr-milestones", "2", "--seed", "3", "--log-every", "1", "--epochs", "2",
         "--accum-steps", "2", "--keep-checkpoints", "1"]  # 12 batches an epoch: 6 steps of 2 micro-batches


class StopsBetweenMicroBatches:
    """The real training loader, which sends this process SIGUSR1 (a real stop signal, to the run's own handler)
    as it delivers its batch number `before` of the run (from 0): with K=2 and an even number, a step's first
    micro-batch, so the stop is pending when that micro-batch is done and the step's second is still to come."""

    def __init__(self, loader, before: int):
        self._loader, self._before, self._delivered = loader, before, 0

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        for each in self._loader:
            if self._delivered == self._before:
                os.kill(os.getpid(), signal.SIGUSR1)
            self._delivered += 1
            yield each


def step_losses(run: Path) -> dict:
    return {r["step"]: r["train/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "val/count" not in r}


def test_a_stop_between_micro_batches_checkpoints_the_step_and_resumes_bit_for_bit(data_dir, tmp_path, monkeypatch):
    rn50.train.main(["--data", str(data_dir), "--out", str(tmp_path / "whole"), *SMALL])
    real = rn50.train.build_loaders

    def stopping(*args, **kwargs):
        train, val = real(*args, **kwargs)
        return StopsBetweenMicroBatches(train, before=2), val  # step 2's first micro-batch (batches 2 and 3)

    monkeypatch.setattr(rn50.train, "build_loaders", stopping)
    args = ["--data", str(data_dir), "--out", str(tmp_path / "stopped"), *SMALL]
    with pytest.raises(SystemExit) as stopped:
        rn50.train.main(args)
    assert stopped.value.code == EXIT_PREEMPTED
    saved = regular_checkpoints(tmp_path / "stopped")
    assert [load_checkpoint(p)["step"] for p in saved] == [2]  # at the step's end, not between its micro-batches
    monkeypatch.setattr(rn50.train, "build_loaders", real)
    rn50.train.main([*args, "--resume", "auto"])
    assert step_losses(tmp_path / "whole") == step_losses(tmp_path / "stopped")  # every step, bit for bit
    whole, resumed = (load_checkpoint(regular_checkpoints(tmp_path / run)[-1]) for run in ("whole", "stopped"))
    assert resumed["step"] == whole["step"] == 12 and resumed["steps_per_epoch"] == 6
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


def test_more_micro_batches_than_an_epoch_holds_is_one_line_and_leaves_no_run_folder(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:  # 48 images in batches of 4: 12 a process
        rn50.train.main(["--data", str(data_dir), "--out", str(out), *SMALL, "--accum-steps", "20"])
    assert stopped.value.code == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == ("error: --accum-steps 20 needs 20 batches per epoch on each process, "
                                               "but the training data gives 12; lower --accum-steps or --batch-size")


def test_the_profile_window_and_the_step_lines_count_optimizer_steps(data_dir, tmp_path, capsys):
    """--profile-steps 2:3 with K=2: optimizer steps 2 and 3, each one ProfilerStep range holding its two
    micro-batches' forward and backward passes and one optimizer step; the step lines say 6 steps an epoch."""
    out = tmp_path / "run"
    rn50.train.main(["--data", str(data_dir), "--out", str(out), *SMALL, "--epochs", "1", "--profile-steps", "2:3"])
    names = annotations(out / "profile" / "rank0.pt.trace.json")
    assert names["ProfilerStep#2"] == names["ProfilerStep#3"] == 1 and "ProfilerStep#4" not in names
    assert (names["input wait"], names["forward"], names["backward"], names["optimizer step"]) == (4, 4, 4, 2)
    printed = capsys.readouterr().out
    assert "(6 steps/epoch x 1 rank x 2 micro-batches x 4)" in printed and "epoch 1 step 6/6 " in printed


@pytest.mark.parametrize("new_world", [1, 3])
def test_an_elastic_resume_continues_an_accumulating_epoch_each_image_once(new_world, data_dir, tmp_path,
                                                                            monkeypatch):
    """Two ranks take 1 step of 2 micro-batches of 4 from the 48 images; resume_point hands the other 32 to the
    new world in whole steps, the loader's position counting micro-batches (2 a step), the epoch ending at its
    usual step. The sampler's log (RN50_SAMPLE_LOG) shows every image at most once."""
    monkeypatch.setenv("RN50_SAMPLE_LOG", str(tmp_path))

    def loader(rank, world):
        return build_loader("torchvision", "train", data_dir, batch_size=4, image_size=32, rank=rank,
                            world_size=world, seed=5, preflight=False, workers=0)

    old = [loader(rank, 2) for rank in range(2)]
    for each in old:
        each.set_epoch(1)
        for _ in zip(range(2), each):  # one optimizer step: two micro-batches
            pass
    recipe = with_fields(Recipe(), batch_size=4, accum_steps=2)
    checkpoint = {"world_size": 2, "steps_per_epoch": len(old[0]) // 2, "epoch": 1, "loader_kind": "torchvision",
                  "step": len(old[0]) // 2 + 1, "loader": [each.state_dict() for each in old], "epoch_losses": None}
    new = [loader(rank, new_world) for rank in range(new_world)]
    steps = len(new[0]) // 2
    point = resume_point(checkpoint, recipe, recipe, "torchvision", DistEnv(0, new_world, 0, torch.device("cpu")),
                         steps, exact=True, train_images=old[0].num_samples)
    assert point.loader_state["position"] == point.loader_state["first"] == 2 * point.offset
    trained = []
    for each in new:
        each.load_state_dict(point.loader_state)
        trained.append([(step, micro) for step, micro, _ in in_steps(each, 2, point.offset, steps)])
    expected = [(step, micro) for step in range(point.offset, steps) for micro in range(2)]
    assert trained == [expected] * new_world and point.offset == steps - 32 // (8 * new_world)
    ids = [i for path in tmp_path.glob("rank*.jsonl") for line in path.read_text().splitlines()
           for i in json.loads(line)["ids"]]
    assert len(ids) == len(set(ids))  # the old ranks' 16 images and the new world's, none twice
