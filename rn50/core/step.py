"""The one training step, shared by rn50.train and benchmarks.run, and the parts it works on."""

from __future__ import annotations

import hashlib
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from rn50.system.dist import DistEnv, all_gather_objects
from rn50.config.errors import UserError
from rn50.core.graphs import WARMUP_STEPS, WARMUP_STEPS_DDP, GraphedStep, capture_stream, check_capturable, on_stream
from rn50.core.losses import batch_mixing, distillation_loss
from rn50.core.model import build_model, count_parameters, load_weights, memory_format, recipe_model
from rn50.core.optim import build_optimizer
from rn50.core.pretrained import start_file
from rn50.core.precision import autocast_dtype, precision_note
from rn50.observe.profiling import named_all_reduce, named_range
from rn50.config.recipe import Distillation, Recipe
from rn50.config.machine import Machine


def check_cuda_only_settings(recipe, machine, device: torch.device) -> None:
    """Settings that only exist on CUDA GPUs, refused at start-up on any other device (before the data is
    listed or a model built) with the flag to drop; on CUDA, what --cuda-graphs cannot capture."""
    if device.type == "cuda":
        if machine.cuda_graphs:
            check_capturable(recipe, machine)
        return
    if recipe.model.sync_bn:
        raise UserError("--sync-bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU implementation); "
                        "drop --sync-bn on this machine")
    if machine.cuda_graphs:
        raise UserError("--cuda-graphs needs a CUDA GPU (it captures the step's GPU kernels and replays them); "
                        "drop --cuda-graphs on this machine")


def fused_optimizer(machine: Machine, device: torch.device) -> bool:
    """The optimizer's fused kernels on CUDA where the machine asks for them; the CPU's for-each kernels."""
    return machine.fused_optimizer and device.type == "cuda"


@dataclass
class TrainingParts:
    model: nn.Module  # DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp_dtype: torch.dtype | None  # None: full fp32 (CPU runs)
    mix: object = None  # MixUp/CutMix on the batch (rn50.core.losses.batch_mixing), or None
    teacher: nn.Module | None = None  # distillation teacher, eval mode, frozen
    kd_alpha: float = 0.8
    kd_temperature: float = 1.0
    ema: AveragedModel | None = None  # EMA of the weights (and BN buffers): WeightEma
    notes: list[str] = field(default_factory=list)  # what building them did that the user should hear
    graphed: object = None  # --cuda-graphs: the captured step (rn50.core.graphs.GraphedStep), run by train_step
    accum_steps: int = 1  # micro-batches per optimizer step (--accum-steps; rn50.core.accumulation)
    clip_grad_norm: float = 0.0  # the gradients' global norm is clipped to this before each optimizer step; 0: off

    @property
    def raw_model(self) -> nn.Module:
        """The model without its DDP wrapper: for checkpoints, and for evaluation, whose forward passes
        must not join DDP's collectives (ranks hold unequal numbers of validation batches)."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model


def _teacher(distillation: Distillation, num_classes: int, env: DistEnv, layout) -> nn.Module:
    teacher = build_model(distillation.teacher_arch, num_classes, zero_init_residual=False)
    load_weights(teacher, distillation.teacher, replace_classifier=False)
    teacher.eval().requires_grad_(False)
    return teacher.to(env.device, memory_format=layout)


class WeightEma(AveragedModel):
    """The EMA of the weights and buffers: torch's AveragedModel with get_ema_multi_avg_fn and use_buffers, the
    same values and the same state_dict ("module.*", "n_averaged"), without its per-step host sync.

    AveragedModel keeps `n_averaged` on the CPU and copies it to the device at every update (a pageable
    copy, which blocks the host each step, inside --cuda-graphs runs too) only to hand it to an EMA that
    never reads it. Here the count stays on the host, where the first-update test and the increment read
    it, and the update is foreach work queued on the device: lerp for floating point tensors, torch's own
    formula for the integer buffers (num_batches_tracked)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        super().__init__(model, use_buffers=True)
        self.decay = decay

    def _apply(self, fn, recurse=True):
        """The count stays on the host when the EMA is moved (.to(device)): only the weights travel."""
        count = self.n_averaged
        super()._apply(fn, recurse)
        self.n_averaged = count
        return self

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if len(ours) != len(theirs):
            raise ValueError(f"EMA of a model with {len(ours)} tensors updated from one with {len(theirs)}")
        if int(self.n_averaged) == 0:  # a CPU tensor: reading it does not wait for the device
            torch._foreach_copy_([a.detach() for a in ours], [b.detach() for b in theirs])
        else:
            floats = [(a.detach(), b.detach()) for a, b in zip(ours, theirs) if a.is_floating_point()]
            if floats:
                torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1 - self.decay)
            integers = [(a.detach(), b.detach()) for a, b in zip(ours, theirs) if not a.is_floating_point()]
            if integers:
                self._average_integers([a for a, _ in integers], [b for _, b in integers])
        self.n_averaged += 1

    def _average_integers(self, ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
        """What get_ema_multi_avg_fn does for integers (num_batches_tracked, one per BN), bit for bit: each
        `a.copy_(a * decay + b * (1 - decay))`, the float result truncated. Done on the stacked counters and
        written back by one foreach copy: a handful of kernels per update, not four per BN layer (212 launches
        per ResNet-50 step, outside the graph under --cuda-graphs). The BN counters are int64 scalars alike;
        torch.stack refuses integer buffers of other shapes loudly, should a model ever bring one."""
        mixed = torch.stack(ours) * self.decay + torch.stack(theirs) * (1 - self.decay)
        torch._foreach_copy_(ours, list(mixed.to(ours[0].dtype).unbind()))


class _NoCudaRuntimeNote(logging.Filter):
    """Drops the one line torch.utils.cpp_extension logs on import when CUDA_HOME exists but no GPU does ("No
    CUDA runtime is found, using CUDA_HOME=..."): inductor imports it under --compile on every CPU machine
    with a CUDA toolkit, and nothing there needs CUDA. Its other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found, using CUDA_HOME")


def quiet_compile_notes() -> None:
    """Installs the filter above once (the logger exists by name before torch imports the module)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNote) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNote())


def class_weights(kind: str, class_counts, device) -> torch.Tensor | None:
    """"balanced": class c's loss weighted by N / (C x n_c) (sklearn's "balanced"), so every class carries
    the same total weight in an epoch; a class without images gets weight 0. "none": None (unweighted)."""
    if kind == "none":
        return None
    if not class_counts:
        raise UserError("--class-weights balanced needs the training images' class counts; the synthetic loader "
                        "draws labels uniformly: drop --class-weights there")
    counts = torch.tensor(class_counts, dtype=torch.float32)
    weights = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp(min=1)), torch.zeros(()))
    return weights.to(device)


def build_training(recipe: Recipe, num_classes: int, env: DistEnv, machine: Machine | None = None,
                   profiling: bool = False, class_counts: tuple[int, ...] | None = None,
                   start_weights: bool = True) -> TrainingParts:
    """The model, optimizer, scaler and loss of the recipe, run the way `machine` says (its speed levers).
    `profiling` (--profile-steps) names the all-reduce too: a Python comm hook, only when profiling.
    `class_counts`: the training images per class, for --class-weights balanced. `start_weights`: load the
    --finetune-from / --weights file (a resumed run does not: the checkpoint's weights replace them)."""
    machine = machine or Machine()
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank
    if env.device.type == "cuda":
        # training shapes are fixed (the loaders drop the last partial batch): time the kernels once per shape
        torch.backends.cudnn.benchmark = machine.cudnn_benchmark
    spec, reg, kd = recipe.model, recipe.regularisation, recipe.distillation
    check_cuda_only_settings(recipe, machine, env.device)  # callers check at start-up; direct callers too
    model, blurred = recipe_model(spec, num_classes)  # BlurPool's hooks first: before weights or compiling
    notes = []
    if blurred:
        notes.append(f"BlurPool before {len(blurred)} strided convolutions (no new parameters: "
                     f"{count_parameters(model):,} in all)")
    source = start_file(spec) if start_weights else None  # --finetune-from's file, or --weights' in the hub cache
    if source is not None:
        path, label = source
        replaced = load_weights(model, path, replace_classifier=True)
        notes.append(f"fine-tuning from {label}" + (f"; new classifier for {num_classes} classes" if replaced else ""))
    if spec.sync_bn and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    layout = memory_format(recipe.precision)
    model = model.to(env.device, memory_format=layout)
    head = model.fc
    ema = WeightEma(model, reg.ema_decay) if reg.ema_decay > 0 else None
    if machine.compile:
        quiet_compile_notes()
        # in place, before DDP: the module keeps its state_dict keys (no `_orig_mod.`), so checkpoints load
        # into an uncompiled model and back; EMA and the teacher stay eager. dynamic=False: one graph per shape
        # (training's is fixed; validation adds eval mode and its last partial batch), never one per step
        model.compile(mode=machine.compile_mode, dynamic=False)
    # --cuda-graphs: DDP is built on the stream that warms the step up and captures it (torch's CUDA-graph notes)
    stream = capture_stream(env.device) if machine.cuda_graphs else None
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        with on_stream(stream):  # static_graph: the same parameters take part in every step, as capture needs
            model = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=machine.ddp_bucket_mb,
                                            gradient_as_bucket_view=machine.ddp_bucket_view,
                                            static_graph=machine.cuda_graphs)
        if stream is not None:
            torch.cuda.current_stream(env.device).wait_stream(stream)
        # fp16: gradients travel in fp16 and are cast back, half the all-reduce bytes
        hook = default_hooks.fp16_compress_hook if machine.ddp_fp16_compress else None
        # whichever all-reduce runs, inside an "all-reduce" range (DDP takes one comm hook); not for a captured
        # step, whose replays call no Python hook
        if profiling and not machine.cuda_graphs:
            hook = named_all_reduce(hook or default_hooks.allreduce_hook)
        if hook is not None:
            model.register_comm_hook(None, hook)
    precision = recipe.precision
    amp_dtype = autocast_dtype(precision.amp, precision.amp_dtype, env.device)
    notes += filter(None, [precision_note(precision.amp, precision.amp_dtype, env.device)])
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(weight=class_weights(reg.class_weights, class_counts, env.device),
                                    label_smoothing=reg.label_smoothing)
    parts = TrainingParts(
        model, build_optimizer(model, recipe.optimisation, head, fused=fused_optimizer(machine, env.device)), scaler,
        criterion, amp_dtype,
        mix=batch_mixing(reg.mixup_alpha, reg.cutmix_alpha, num_classes),
        teacher=_teacher(kd, num_classes, env, layout) if kd.teacher else None,
        kd_alpha=kd.alpha, kd_temperature=kd.temperature, ema=ema, notes=notes,
        accum_steps=recipe.optimisation.accum_steps, clip_grad_norm=recipe.optimisation.clip_grad_norm,
    )
    if machine.cuda_graphs:
        parts.graphed = GraphedStep(parts, train_step, stream, WARMUP_STEPS_DDP if env.distributed else WARMUP_STEPS)
    return parts


def state_digest(model: nn.Module) -> str:
    """A hash of every parameter's and buffer's bytes: equal digests mean bit-identical models."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def replicas_identical(model: nn.Module) -> bool:
    """Whether every rank holds bit-identical weights and buffers (one digest per rank, gathered); DDP keeps
    them equal, and validation syncs the BN statistics. True in a single process."""
    return len(set(all_gather_objects(state_digest(model)))) == 1


def train_step(parts: TrainingParts, images: torch.Tensor, labels: torch.Tensor, micro: int = 0) -> torch.Tensor:
    """One micro-batch of an optimizer step: forward under autocast, loss, scaled backward; after the step's last
    micro-batch also the optimizer and scaler step (clipped first where the recipe says) and the EMA update.

    `micro`: this batch's place among the step's `parts.accum_steps` micro-batches (rn50.core.accumulation.in_steps
    numbers them); without accumulation every call is a whole step. The first micro-batch zeroes the gradients,
    each adds its loss / K to them (so the step's gradient is that of the mean over its K x batch images), and
    under DDP only the last one all-reduces them (no_sync before). BatchNorm normalises each micro-batch with its
    own statistics and updates its running statistics once per micro-batch.

    Returns this micro-batch's detached loss (not divided by K) without synchronising with the device: callers
    read it with .item() only at log intervals.
    """
    if parts.graphed is not None:  # --cuda-graphs: this body, captured once and replayed (rn50/core/graphs.py)
        return parts.graphed(images, labels)
    accum, last = parts.accum_steps, micro == parts.accum_steps - 1
    if not 0 <= micro < accum:
        raise ValueError(f"micro-batch {micro} of a step of {accum}")
    if micro == 0:
        parts.optimizer.zero_grad(set_to_none=True)
    if parts.mix is not None:
        images, labels = parts.mix(images, labels)  # labels become class probabilities
    # DDP all-reduces in the backward pass, if the forward pass prepared it (no_sync must hold both): only on the
    # step's last micro-batch, whose backward reduces the sum of all K
    syncing = last or not isinstance(parts.model, DistributedDataParallel)
    with nullcontext() if syncing else parts.model.no_sync():
        with named_range("forward"), \
                torch.autocast(images.device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
            logits = parts.model(images)
            loss = parts.criterion(logits, labels)
            if parts.teacher is not None:
                with torch.no_grad():
                    teacher_logits = parts.teacher(images)
                loss = distillation_loss(logits, teacher_logits, loss, parts.kd_alpha, parts.kd_temperature)
        with named_range("backward"):
            parts.scaler.scale(loss / accum if accum > 1 else loss).backward()
    if not last:
        return loss.detach()
    with named_range("optimizer step"):
        if parts.clip_grad_norm > 0:
            clip_gradients(parts)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        if parts.ema is not None:
            parts.ema.update_parameters(parts.raw_model)
    return loss.detach()


def clip_gradients(parts: TrainingParts) -> torch.Tensor:
    """Clip the step's gradients (accumulated over its micro-batches) to a global L2 norm of parts.clip_grad_norm.

    Under GradScaler (fp16) the gradients are first unscaled in place (scaler.unscale_), so the norm is that of
    the true gradients; scaler.step then sees the optimizer unscaled and does not unscale again, and skips the
    step, as always, when the unscale found an inf or NaN (its norm is then inf or NaN too, and the clipped
    gradients NaN, which the skipped step never applies). Nothing here waits for the device: the norm stays a
    device tensor (foreach norms, error_if_nonfinite=False reads nothing back), so the step stays capturable
    under --cuda-graphs. Returns the norm before clipping (a device tensor)."""
    parts.scaler.unscale_(parts.optimizer)
    return torch.nn.utils.clip_grad_norm_(parts.raw_model.parameters(), parts.clip_grad_norm, foreach=True,
                                          error_if_nonfinite=False)
