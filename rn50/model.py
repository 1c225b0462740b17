"""ResNet models: torchvision's architecture (resnet50 has 25,557,032 parameters at 1000 classes)."""

from __future__ import annotations

import torch
import torchvision

from rn50.errors import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def build_model(arch: str, num_classes: int, zero_init_residual: bool = True) -> torch.nn.Module:
    """A randomly initialised ResNet. zero_init_residual sets gamma=0 in the last BN of each block
    (bn3 of a Bottleneck, bn2 of a BasicBlock), so every block starts as the identity."""
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    builder = getattr(torchvision.models, arch)
    return builder(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
