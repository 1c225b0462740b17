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


def load_weights(model: torch.nn.Module, path: str, replace_classifier: bool) -> list[str]:
    """Load a torchvision state dict or one of our checkpoints into `model`.

    With replace_classifier, a classifier (fc) of another shape is left as initialised (fine-tuning for
    C classes); everything else must match. Returns the names left as initialised."""
    from pathlib import Path

    if not Path(path).is_file():
        raise UserError(f"weights file {path} does not exist; pass a checkpoint_*.pt of ours or a torchvision "
                        "state dict (.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"weights file {path} cannot be read ({type(exc).__name__}); pass a .pt/.pth state dict") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from a DDP wrapper
    own = model.state_dict()
    kept = [k for k in ("fc.weight", "fc.bias")
            if replace_classifier and k in state and state[k].shape != own[k].shape]
    for key in kept:
        del state[key]
    fit = f"check --arch / --kd-teacher-arch (the weights must be a {type(model).__name__} of the same depth)"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shapes differ: another depth
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"{path} does not fit this model ({detail}); {fit}") from None
    if set(missing) - set(kept) or unexpected:
        raise UserError(f"{path} does not fit this model: missing {sorted(set(missing) - set(kept))[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}; {fit}")
    return kept
