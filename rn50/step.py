"""The one training step, shared by rn50.train and benchmarks.run, and the parts it works on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rn50.dist import DistEnv
from rn50.model import build_model
from rn50.optim import build_optimizer
from rn50.recipe import Recipe


@dataclass
class TrainingParts:
    model: nn.Module  # DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp_dtype: torch.dtype | None  # None: full fp32 (CPU runs)

    @property
    def raw_model(self) -> nn.Module:
        """The model without its DDP wrapper: for checkpoints, and for evaluation, whose forward passes
        must not join DDP's collectives (ranks hold unequal numbers of validation batches)."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model


def build_training(recipe: Recipe, num_classes: int, env: DistEnv) -> TrainingParts:
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # training shapes are fixed (DROP): pick the fastest kernels once
    model = build_model(recipe.arch, num_classes, recipe.zero_init_residual)
    if recipe.sync_bn and env.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model = model.to(env.device, memory_format=memory_format)
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    # AMP where it pays, on CUDA; the CPU path stays fp32 (fp16 convolutions on CPU are slow or missing).
    use_amp = recipe.amp and env.device.type == "cuda"
    amp_dtype = getattr(torch, recipe.amp_dtype) if use_amp else None
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    return TrainingParts(model, build_optimizer(model, recipe), scaler, criterion, amp_dtype)


def state_digest(model: nn.Module) -> str:
    """A hash of every parameter's and buffer's bytes: equal digests mean bit-identical models."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_step(parts: TrainingParts, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward under autocast, loss, scaled backward, optimizer and scaler step.

    Returns the detached loss tensor without synchronising with the device: callers read it with
    .item() only at log intervals.
    """
    parts.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
        loss = parts.criterion(parts.model(images), labels)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    return loss.detach()
