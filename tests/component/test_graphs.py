"""--cuda-graphs: the whole training step captured once and replayed (rn50/core/graphs.py).

On the CPU: what cannot be captured is refused at start-up, and the graphed step's orchestration (mixing and
EMA outside the graph, the LR copied into device tensors every call, static input buffers, warm-up then
capture, a new capture at a new image size) gives bit for bit the eager step's losses and weights, with the
capture and replay replaced by eager calls. The capture itself is tested only under `gpu` (run `pytest -m gpu` on a
GPU machine): there every call of the graphed step is compared with the eager step one step at a time, from equal
states (one_step_from_equal_states), never along a trajectory; tests/gpu/test_gpu.py does the same under an NCCL DDP
group.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rn50.core.step import check_cuda_only_settings
from rn50.system.dist import DistEnv
from rn50.config.errors import UserError
from rn50.core.graphs import WARMUP_STEPS, GraphedStep
from rn50.core.precision import batch_dtype
from rn50.config.machine import Machine
from rn50.config.recipe import with_fields
from rn50.core.schedule import set_lr
from rn50.core.optim import build_optimizer
from rn50.core.step import build_training, train_step

from conftest import CLASSES, gpu_ddp_processes, run_cli, torchrun

CUDA = torch.device("cuda", 0)  # a device object only: nothing touches CUDA in the CPU tests


@pytest.mark.parametrize("fields, machine, words", [
    ({"optimizer": "lamb"}, {}, ("cannot capture LAMB", "--optimizer sgd or adamw")),
    ({}, {"fused_optimizer": False}, ("needs the fused optimizer", "drop --no-fused-optimizer")),
    ({}, {"compile": True, "compile_mode": "reduce-overhead"},
     ("--compile-mode reduce-overhead", "--compile-mode default")),
    ({}, {"compile": True, "compile_mode": "max-autotune"}, ("--compile-mode max-autotune", "drop --cuda-graphs")),
    ({"accum_steps": 2}, {}, ("not --accum-steps 2 micro-batches", "use --accum-steps 1 or drop --cuda-graphs")),
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
    ({"clip_grad_norm": 1.0}, {}),
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


def as_on_a_gpu(fields: dict, device: str = "cpu"):
    """The training parts a GPU run builds, `device` "cpu" included: the fused optimizer, the recipe's autocast
    dtype with GradScaler for float16, SyncBatchNorm modules for sync_bn. torch runs each of them on the CPU too
    (fused SGD and AdamW kernels, CPU autocast in fp16 and bf16, GradScaler("cpu")), where build_training would
    choose the CPU's own (for-each kernels, fp32, no scaler) and refuse sync-BN."""
    recipe = with_fields(arch="resnet18", batch_size=4, **fields)
    env = DistEnv(0, 1, 0, torch.device(device))
    if device == "cuda":
        return build_training(recipe, CLASSES, env)
    parts = build_training(with_fields(arch="resnet18", batch_size=4, **{**fields, "sync_bn": False}), CLASSES, env)
    if recipe.model.sync_bn:  # one process: SyncBatchNorm's own forward, without a group to synchronise with
        parts.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(parts.model)
    parts.optimizer = build_optimizer(parts.raw_model, recipe.optimisation, parts.raw_model.fc, fused=True)
    parts.amp_dtype = getattr(torch, recipe.precision.amp_dtype) if recipe.precision.amp else None
    parts.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=parts.amp_dtype == torch.float16)
    return parts


@pytest.mark.parametrize("warmup_steps", [1, 0])
def test_graphed_fused_sgd_survives_an_overflowing_first_step(uninitialised_memory_is_nan, warmup_steps):
    """The GPU's step on the CPU: fused SGD (torch's CPU fused kernel) under an enabled GradScaler, graphed. The
    very first step overflows (an inf in the batch), in the eager warm-up (1) or as the first replay (0): the
    scaler skips it, the weights and the momentum stay as they were, and the next step is the eager step's
    first one (plain SGD, no scaler) from the same weights. Uninitialised memory reads as NaN (the fixture)."""
    eager = build_training(with_fields(arch="resnet18", batch_size=4), CLASSES, DistEnv(0, 1, 0, torch.device("cpu")))
    graphed = as_on_a_gpu({"amp": False})  # fp32 on both sides, GradScaler enabled by hand
    graphed.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    graphed.graphed = stand_ins = EagerStandIns(graphed, train_step, None, warmup_steps=warmup_steps)
    before = [p.detach().clone() for p in graphed.raw_model.parameters()]
    (images, labels), (poisoned, _) = small_batches(2)
    poisoned[0, 0, 0, 0] = float("inf")
    set_lr(graphed.optimizer, 0.1)
    assert not torch.isfinite(train_step(graphed, poisoned, labels))
    assert graphed.scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(p, q) for p, q in zip(graphed.raw_model.parameters(), before))
    buffers = [graphed.optimizer.state[p].get("momentum_buffer") for p in graphed.raw_model.parameters()]
    assert all(buf is not None and not buf.any() for buf in buffers)
    for parts in (graphed, eager):
        set_lr(parts.optimizer, 0.1)
        train_step(parts, images, labels)
    assert stand_ins.captured and stand_ins.calls == 2
    # the same fp32 update in other roundings (tests/unit/test_fused_optimizer.py, TOLERANCE): a few ulps at most
    for ours, theirs in zip(graphed.raw_model.parameters(), eager.raw_model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


class HostSyncs(TorchDispatchMode):
    """Records each op that makes the host wait for the device, which a CUDA graph capture cannot hold: a value
    read back (.item(), a tensor's truth, torch.equal), an output whose size depends on values (nonzero, unique,
    masked_select), a copy between the host and a device (seen where the device is a GPU; on the CPU every tensor
    lives on the host, and those copies stay the GPU run's to catch)."""

    READS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.allclose", "aten.nonzero",
             "aten.masked_select", "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
             "aten.repeat_interleave"}
    COPIES = {"aten._to_copy", "aten.copy_", "aten._copy_from"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func).rsplit(".", 1)[0]
        devices = {t.device.type for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)}
        if name in self.READS or (name in self.COPIES and "cpu" in devices and len(devices) > 1):
            self.seen.append(name)
        return out


class CheckedCapture(EagerStandIns):
    """The stand-ins, with the captured body run under HostSyncs at every "replay"."""

    def _replay(self):
        with HostSyncs() as mode:
            super()._replay()
        self.syncs = getattr(self, "syncs", []) + mode.seen


CAPTURED_RECIPES = {"sgd fp16": {}, "adamw": {"optimizer": "adamw"}, "bf16": {"amp_dtype": "bfloat16"},
                    "mixup + ema": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "ema_decay": 0.9, "label_smoothing": 0.1},
                    "sync-bn": {"sync_bn": True},
                    # GradScaler's unscale_ and torch's clip_grad_norm_ (foreach norms, error_if_nonfinite=False)
                    "clipped sgd fp16": {"clip_grad_norm": 0.5}, "clipped adamw bf16": {"optimizer": "adamw",
                                                                                       "amp_dtype": "bfloat16",
                                                                                       "clip_grad_norm": 0.5}}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", CAPTURED_RECIPES)
def test_the_captured_step_makes_the_host_wait_for_nothing(name, device):
    """Every recipe --cuda-graphs accepts (check_cuda_only_settings), its captured body (the fused optimizer,
    GradScaler, autocast; AdamW marked capturable) after the eager warm-up: no op in it may read a value back
    or copy to or from the host, or the capture breaks on the GPU. On the CPU, sync-BN runs its module without
    a group (its synchronising branch needs a GPU and a second process: tests/gpu/test_gpu.py)."""
    fields = CAPTURED_RECIPES[name]
    check_cuda_only_settings(with_fields(**fields), Machine(cuda_graphs=True), CUDA)  # accepted for capture
    parts = as_on_a_gpu(fields, device)
    parts.graphed = step = CheckedCapture(parts, train_step, None, warmup_steps=1)
    dtype = batch_dtype(parts.amp_dtype)
    for images, labels in small_batches(3):
        set_lr(parts.optimizer, 0.1)
        loss = train_step(parts, images.to(device, dtype), labels.to(device))
    assert step.captured and torch.isfinite(loss)
    assert step.syncs == [], step.syncs


def test_the_host_sync_check_sees_the_sync_the_unfused_optimizer_makes():
    """The yardstick: the unfused optimizer under GradScaler reads found_inf with .item() (refused at start-up
    with --cuda-graphs, test_cuda_graphs_refuses_at_start_up_what_it_cannot_capture); the check sees it."""
    parts = as_on_a_gpu({})
    parts.optimizer = build_optimizer(parts.raw_model, with_fields().optimisation, parts.raw_model.fc, fused=False)
    parts.graphed = step = CheckedCapture(parts, train_step, None, warmup_steps=1)
    for images, labels in small_batches(3):
        set_lr(parts.optimizer, 0.1)
        train_step(parts, images.half(), labels)
    assert "aten._local_scalar_dense" in step.syncs, step.syncs


# --- on a GPU -----------------------------------------------------------------------------------------

def gpu_batches(n, dtype, batch=8, size=32, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, device="cuda", generator=generator)
             .to(dtype).contiguous(memory_format=torch.channels_last),
             torch.randint(0, CLASSES, (batch,), device="cuda", generator=generator)) for _ in range(n)]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| (L2 over the tensor); 0 when both are exactly zero."""
    error = torch.linalg.vector_norm((got - want).double()).item()
    if not error:
        return 0.0
    scale = torch.linalg.vector_norm(want.double()).item()
    return error / scale if scale else float("inf")


def one_step_from_equal_states(eager, graphed, images, labels, lr, tol, update_tol=None, seed=0) -> torch.Tensor:
    """The eager parts take the graphed parts' state (weights, buffers, optimizer state, the scaler's scale,
    the EMA); then both take one training step on the same batch at the same LR, and the step's results must
    agree: the loss, every gradient, every weight update, the BN statistics' updates, the scale, the EMA.

    One step from equal states, never a trajectory: over several steps on random data the two runs' rounding
    differences grow without bound, whereas here they stay at the level of one step's arithmetic. The graph
    runs the eager step's very kernels (one cuDNN benchmark cache per process), so both usually agree to the
    bit; what may differ is the order of accumulations in kernels with atomics and, should cuDNN pick another
    algorithm, the rounding of fp16/bf16/TF32 operands, ~half a unit in the last place per layer:
    fp16 and TF32 (fp32 convolutions' default) 2^-11 = 5e-4, bf16 2^-9 = 2e-3, over the ~20 layers a gradient
    crosses a random walk of sqrt(20) x that, 2e-3 and 9e-3. `tol`: 1e-2 (5e-2 for bf16), four to five times
    that. What this catches is coarse: a batch, an LR or optimizer state the graph did not read anew (the LR
    changes by 1.5x or more from step to step in the callers), a step that did not run, weights the EMA read
    before the step: errors of 30% and more. `update_tol` (default `tol`): AdamW's first update is
    lr * g / (|g| + eps), nearly sign(g), so a gradient element within rounding of zero can flip a whole
    update element; such elements are rare, and 0.1 still tells a stale LR (>= 33%) apart.
    Returns the loss the graphed step returned (a tensor the next steps must not change)."""
    update_tol = tol if update_tol is None else update_tol
    eager.raw_model.load_state_dict(graphed.raw_model.state_dict())
    # deep-copied: Optimizer.load_state_dict keeps tensors already on the right device and dtype, so the eager
    # step would otherwise write the graphed optimizer's momentum buffers (those the graph reads) in place
    eager.optimizer.load_state_dict(copy.deepcopy(graphed.optimizer.state_dict()))
    eager.scaler.load_state_dict(graphed.scaler.state_dict())
    if graphed.ema is not None:
        eager.ema.load_state_dict(graphed.ema.state_dict())
    scale = graphed.scaler.get_scale()
    params_before = {name: p.detach().clone() for name, p in graphed.raw_model.named_parameters()}
    buffers_before = {name: b.clone() for name, b in graphed.raw_model.named_buffers()}
    losses = []
    for parts in (eager, graphed):
        torch.default_generator.manual_seed(seed)  # Mixup/CutMix draw on the host: the same draws for both
        set_lr(parts.optimizer, lr)
        losses.append(train_step(parts, images, labels))
    eager_loss, graphed_loss = (loss.float().item() for loss in losses)
    assert abs(graphed_loss - eager_loss) <= tol * abs(eager_loss), (graphed_loss, eager_loss)
    assert graphed.scaler.get_scale() == eager.scaler.get_scale()  # powers of two: exact, overflow or not
    skipped = eager.scaler.get_scale() < scale  # an fp16 overflow: both skip the update, and the scale halves
    ours, theirs = dict(eager.raw_model.named_parameters()), dict(graphed.raw_model.named_parameters())
    worst = {}
    for name, before in params_before.items():
        want, got = ours[name].detach() - before, theirs[name].detach() - before
        if skipped:
            assert not want.any() and not got.any(), f"{name}: updated on a step the scaler skipped"
            continue
        worst[f"update {name}"] = (_relative(got, want), update_tol)
        if ours[name].grad is not None or theirs[name].grad is not None:
            assert ours[name].grad is not None and theirs[name].grad is not None, f"{name}: a gradient on one side"
            worst[f"grad {name}"] = (_relative(theirs[name].grad, ours[name].grad), tol)
    ours, theirs = dict(eager.raw_model.named_buffers()), dict(graphed.raw_model.named_buffers())
    for name, before in buffers_before.items():
        if before.is_floating_point():  # BN running statistics: the step's forward updated them
            worst[f"buffer {name}"] = (_relative(theirs[name] - before, ours[name] - before), tol)
        else:
            assert torch.equal(theirs[name], ours[name]), name
    failed = {name: f"{error:.3g} > {limit:g}" for name, (error, limit) in worst.items() if not error <= limit}
    assert not failed, failed
    if graphed.ema is not None:  # the EMA of the weights the step wrote: off by what their updates are off by
        assert eager.ema.n_averaged == graphed.ema.n_averaged
        updates = torch.cat([(p.detach() - params_before[name]).reshape(-1)
                             for name, p in eager.raw_model.named_parameters()])
        apart = torch.cat([(a.detach() - b.detach()).reshape(-1)
                           for a, b in zip(graphed.ema.module.parameters(), eager.ema.module.parameters())])
        assert torch.linalg.vector_norm(apart) <= update_tol * torch.linalg.vector_norm(updates), \
            (torch.linalg.vector_norm(apart).item(), torch.linalg.vector_norm(updates).item())
    return losses[1]


class StaleLrStandIns(EagerStandIns):
    """A graph that kept the LR of its capture step, as a captured Python float would: the fault the device LR
    tensors exist to prevent, for the test below to catch."""

    def _load(self, images, labels):
        kept = [lr.clone() for lr in self.lrs]
        super()._load(images, labels)
        if self.captured:
            for lr, old in zip(self.lrs, kept):
                lr.copy_(old)


def test_the_one_step_comparison_passes_the_graphed_orchestration_and_catches_a_stale_lr():
    """The GPU tests' yardstick, checked on the CPU: the stand-ins' steps (bit for bit the eager ones here) pass it
    at any tolerance, EMA and mixing included; a graph that kept its capture step's LR fails it."""
    recipe = with_fields(arch="resnet18", batch_size=4, mixup_alpha=0.2, ema_decay=0.9)
    cpu = DistEnv(0, 1, 0, torch.device("cpu"))
    batches = small_batches(4)
    for stand_ins, fails in ((EagerStandIns, False), (StaleLrStandIns, True)):
        eager, graphed = build_training(recipe, CLASSES, cpu), build_training(recipe, CLASSES, cpu)
        graphed.graphed = stand_ins(graphed, train_step, None, warmup_steps=1)
        for i, (images, labels) in enumerate(batches[:2]):  # the warm-up step, the capture step
            one_step_from_equal_states(eager, graphed, images, labels, 0.01 * (1 + i % 3), 1e-9, seed=i)
        for i, (images, labels) in enumerate(batches[2:], start=2):  # replays, at LRs the capture did not see
            if fails:
                with pytest.raises(AssertionError, match="update"):
                    one_step_from_equal_states(eager, graphed, images, labels, 0.01 * (1 + i % 3), 1e-2, seed=i)
                break
            one_step_from_equal_states(eager, graphed, images, labels, 0.01 * (1 + i % 3), 1e-9, seed=i)
        assert graphed.graphed.captured

@pytest.mark.gpu
@pytest.mark.parametrize("fields, lr, tol, update_tol", [
    ({"amp": False}, 0.01, 1e-2, None),  # fp32 (TF32 convolutions, torch's default)
    ({}, 0.01, 1e-2, None),  # AMP fp16 with GradScaler (its inf check and scale update inside the graph)
    ({"amp_dtype": "bfloat16"}, 0.01, 5e-2, None),
    ({"optimizer": "adamw"}, 0.0005, 1e-2, 0.1),
    ({"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "ema_decay": 0.9}, 0.01, 1e-2, None),  # both outside the graph
    ({"clip_grad_norm": 0.5}, 0.01, 1e-2, None),  # GradScaler's unscale_ and the clipping inside the graph
])
def test_graphed_step_follows_the_eager_step_on_the_gpu(fields, lr, tol, update_tol):
    """Every call of the graphed step (the eager warm-up, the capture, the replays, and again at a new image
    size) is the eager step, one step at a time from equal states: see one_step_from_equal_states."""
    recipe = with_fields(arch="resnet18", batch_size=8, **fields)
    env = DistEnv(0, 1, 0, CUDA)
    eager = build_training(recipe, CLASSES, env, Machine())
    graphed = build_training(recipe, CLASSES, env, Machine(cuda_graphs=True))
    step = graphed.graphed
    assert isinstance(step, GraphedStep) and eager.graphed is None and step.warmup_steps == WARMUP_STEPS
    dtype = batch_dtype(eager.amp_dtype)  # what the loaders hand this step
    # warm-up, the capture step, two replays; a new size: warm-up again, the capture step, one replay
    first, second = WARMUP_STEPS + 3, WARMUP_STEPS + 2
    batches = gpu_batches(first, dtype) + gpu_batches(second, dtype, size=48, seed=1)
    lrs = [lr * (1 + i % 3) for i in range(len(batches))]  # a new LR every step: the graph must read each one
    losses, read_at_once = [], []
    for i, ((images, labels), step_lr) in enumerate(zip(batches, lrs)):
        losses.append(one_step_from_equal_states(eager, graphed, images, labels, step_lr, tol, update_tol, seed=i))
        read_at_once.append(losses[-1].item())
        at_new_size = i - first  # calls since the size changed
        assert step.captured == (i >= WARMUP_STEPS if at_new_size < 0 else at_new_size >= WARMUP_STEPS), i
        assert step.captures == (0 if i < WARMUP_STEPS else 1 if i < first + WARMUP_STEPS else 2), i
    assert step.capture_s > 0 and tuple(step.static_images.shape) == (8, 3, 48, 48)
    # the losses returned stay as they were when returned: a replay rewrites the graph's own loss tensor only
    assert [loss.item() for loss in losses] == read_at_once
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
