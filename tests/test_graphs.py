"""--cuda-graphs: the whole training step captured once and replayed (rn50/graphs.py).

On the CPU: what cannot be captured is refused at start-up, and the graphed step's orchestration (mixing and
EMA outside the graph, the LR copied into device tensors every call, static input buffers, warm-up then
capture, a new capture at a new image size) gives bit for bit the eager step's losses and weights, with the
capture and replay replaced by eager calls. The capture itself is tested only under `gpu` (run `pytest -m gpu` on a GPU machine).
"""

from __future__ import annotations

import json

import pytest
import torch

from rn50.device import check_cuda_only_settings
from rn50.dist import DistEnv
from rn50.errors import UserError
from rn50.graphs import GraphedStep
from rn50.recipe import Machine, with_fields
from rn50.schedule import set_lr
from rn50.step import build_training, train_step

from conftest import CLASSES, gpu_ddp_processes, run_cli, torchrun

CUDA = torch.device("cuda", 0)  # a device object only: nothing touches CUDA in the CPU tests


@pytest.mark.parametrize("fields, machine, words", [
    ({"optimizer": "lamb"}, {}, ("cannot capture LAMB", "--optimizer sgd or adamw")),
    ({}, {"fused_optimizer": False}, ("needs the fused optimizer", "drop --no-fused-optimizer")),
    ({}, {"compile": True, "compile_mode": "reduce-overhead"},
     ("--compile-mode reduce-overhead", "--compile-mode default")),
    ({}, {"compile": True, "compile_mode": "max-autotune"}, ("--compile-mode max-autotune", "drop --cuda-graphs")),
])
def test_cuda_graphs_refuses_at_start_up_what_it_cannot_capture(fields, machine, words):
    with pytest.raises(UserError) as caught:
        check_cuda_only_settings(with_fields(**fields), Machine(cuda_graphs=True, **machine), CUDA)
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message


@pytest.mark.parametrize("fields, machine", [
    ({}, {}),  # SGD, fp16 AMP with GradScaler
    ({"optimizer": "adamw", "amp_dtype": "bfloat16"}, {}),
    ({"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "ema_decay": 0.99, "label_smoothing": 0.1}, {}),
    ({"sync_bn": True}, {"compile": True, "ddp_fp16_compress": True}),
])
def test_cuda_graphs_accepts_what_it_captures(fields, machine):
    check_cuda_only_settings(with_fields(**fields), Machine(cuda_graphs=True, **machine), CUDA)


class EagerStandIns(GraphedStep):
    """GraphedStep with its CUDA parts replaced: the side stream is the current one, "capture" keeps the
    work without running it (as a capture runs nothing), and a "replay" runs it into the static loss."""

    def _on_side_stream(self, work):
        return work()

    def _capture(self, work):
        self.graph = work
        return torch.empty(())

    def _replay(self):
        self.static_loss.copy_(self.graph())

    def _sync(self):
        pass


def steps(parts, batches, lrs):
    """The step's losses, stacked after the last step: a returned loss must keep its value when later steps
    run (a replay overwrites the graph's own loss tensor), so each is also read as soon as it comes."""
    torch.manual_seed(123)  # Mixup/CutMix draw from the global generator: the same draws for both runs
    losses, read_at_once = [], []
    for (images, labels), lr in zip(batches, lrs):
        set_lr(parts.optimizer, lr)
        losses.append(train_step(parts, images, labels))
        read_at_once.append(losses[-1].item())
    assert [loss.item() for loss in losses] == read_at_once
    return torch.stack(losses)


def small_batches(n, batch=4, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=generator).contiguous(memory_format=torch.channels_last),
             torch.randint(0, CLASSES, (batch,), generator=generator)) for _ in range(n)]


def test_graphed_step_orchestration_gives_the_eager_step_bit_for_bit_on_the_cpu():
    recipe = with_fields(arch="resnet18", batch_size=4, mixup_alpha=0.2, cutmix_alpha=1.0, ema_decay=0.9,
                         label_smoothing=0.1)
    cpu = DistEnv(0, 1, 0, torch.device("cpu"))
    eager, graphed = build_training(recipe, CLASSES, cpu), build_training(recipe, CLASSES, cpu)
    graphed.graphed = stand_ins = EagerStandIns(graphed, train_step, None, warmup_steps=2)
    batches, lrs = small_batches(6), [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]  # a new LR every step, as training sets
    expected, got = steps(eager, batches, lrs), steps(graphed, batches, lrs)
    assert stand_ins.captured and stand_ins.calls == 6
    assert torch.equal(expected, got)
    for ours, theirs in ((eager.raw_model, graphed.raw_model), (eager.ema.module, graphed.ema.module)):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    # the groups hold the floats set_lr wrote, as an eager run's checkpoint does
    assert graphed.optimizer.state_dict()["param_groups"] == eager.optimizer.state_dict()["param_groups"]


def test_graphed_step_captures_again_at_a_new_image_size():
    """Progressive resizing changes the image size between epochs: warm up again and capture at the new one."""
    recipe = with_fields(arch="resnet18", batch_size=4)
    cpu = DistEnv(0, 1, 0, torch.device("cpu"))
    eager, graphed = build_training(recipe, CLASSES, cpu), build_training(recipe, CLASSES, cpu)
    graphed.graphed = stand_ins = EagerStandIns(graphed, train_step, None, warmup_steps=2)
    batches, lrs = small_batches(4) + small_batches(5, size=48, seed=1), [0.01] * 9
    expected, got = steps(eager, batches, lrs), steps(graphed, batches, lrs)
    assert stand_ins.captures == 2 and stand_ins.captured and tuple(stand_ins.static_images.shape) == (4, 3, 48, 48)
    assert torch.equal(expected, got)
    assert all(torch.equal(a, b) for a, b in zip(eager.raw_model.state_dict().values(),
                                                 graphed.raw_model.state_dict().values()))


# --- on a GPU -----------------------------------------------------------------------------------------

def gpu_batches(n, dtype, batch=8, size=32):
    generator = torch.Generator(device="cuda").manual_seed(0)
    return [(torch.randn(batch, 3, size, size, device="cuda", generator=generator)
             .to(dtype).contiguous(memory_format=torch.channels_last),
             torch.randint(0, CLASSES, (batch,), device="cuda", generator=generator)) for _ in range(n)]


@pytest.mark.gpu
@pytest.mark.parametrize("fields, lr, rtol", [
    ({"amp": False}, 0.01, 1e-3),  # fp32
    ({}, 0.01, 2e-2),  # AMP fp16 with GradScaler (its inf check and scale update inside the graph)
    ({"amp_dtype": "bfloat16"}, 0.01, 2e-2),
    ({"optimizer": "adamw"}, 0.0005, 2e-2),
    ({"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "ema_decay": 0.9}, 0.01, 2e-2),  # both outside the graph
])
def test_graphed_step_follows_the_eager_step_on_the_gpu(fields, lr, rtol):
    recipe = with_fields(arch="resnet18", batch_size=8, **fields)
    env = DistEnv(0, 1, 0, CUDA)
    eager = build_training(recipe, CLASSES, env, Machine())
    graphed = build_training(recipe, CLASSES, env, Machine(cuda_graphs=True))
    assert isinstance(graphed.graphed, GraphedStep) and eager.graphed is None
    n = graphed.graphed.warmup_steps + 5  # warm-up, the capture step, then replays
    batches = gpu_batches(n, torch.float16 if eager.amp_dtype else torch.float32)
    lrs = [lr * (1 + i / n) for i in range(n)]  # a new LR every step: the graph must read each one
    expected, got = steps(eager, batches, lrs), steps(graphed, batches, lrs)
    assert graphed.graphed.captured and graphed.graphed.capture_s > 0
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=1e-3)
    for ours, theirs in ((eager.raw_model, graphed.raw_model),) + (
            ((eager.ema.module, graphed.ema.module),) if eager.ema is not None else ()):
        for name, a in ours.state_dict().items():
            b = theirs.state_dict()[name]
            if a.is_floating_point():
                torch.testing.assert_close(b, a, rtol=rtol, atol=1e-3, msg=f"{name} after {n} steps")
            else:
                assert torch.equal(a, b), name
    assert graphed.scaler.get_scale() == eager.scaler.get_scale()
    # the checkpointed optimizer state is the eager one's: floats in the groups, the same keys
    assert all(group["lr"] == lrs[-1] for group in graphed.optimizer.state_dict()["param_groups"])


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--ema-decay", "0.99", "--mixup-alpha", "0.2", "--compile"]])
def test_cuda_graphs_training_run_on_the_gpu(data_dir, tmp_path, extra):
    nproc = gpu_ddp_processes(torch.cuda.device_count())
    out = tmp_path / "run"
    # 48 images, batch 8: 6 steps an epoch per process on one GPU, 3 on two; DDP warms up for 11 steps first
    done = run_cli(torchrun(nproc, "-m", "rn50.train", "--data", str(data_dir), "--out", str(out), "--loader", "dali",
                            "--epochs", "6", "--batch-size", "8", "--image-size", "64", "--arch", "resnet18",
                            "--cuda-graphs", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ddp/replicas_identical"] is True
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(loss == loss and abs(loss) < 1e3 for loss in losses)  # finite
