"""ResNet models: torchvision's architecture (resnet50 has 25,557,032 parameters at 1000 classes)."""

from __future__ import annotations

from functools import lru_cache

import torch
import torchvision

from rn50.config.errors import UserError
from rn50.config.recipe import ARCHS, Model, Precision


def build_model(arch: str, num_classes: int, zero_init_residual: bool = True) -> torch.nn.Module:
    """A randomly initialised ResNet. zero_init_residual sets gamma=0 in the last BN of each block
    (bn3 of a Bottleneck, bn2 of a BasicBlock), so every block starts as the identity."""
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    builder = getattr(torchvision.models, arch)
    return builder(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)


def recipe_model(spec: Model, num_classes: int) -> tuple[torch.nn.Module, list[str]]:
    """The recipe's model, randomly initialised, as training and rn50.evaluate both build it: its
    architecture and zero-init residual, with BlurPool where it asks (before any weights are loaded or the
    model compiled: the hooks ride on the convolutions). Returns it and the blurred convolutions' names."""
    model = build_model(spec.arch, num_classes, spec.zero_init_residual)
    return model, add_blurpool(model) if spec.blurpool else []


def memory_format(precision: Precision) -> torch.memory_format:
    """The recipe's memory layout for the model (and the batch): channels_last (NHWC) or contiguous."""
    return torch.channels_last if precision.channels_last else torch.contiguous_format


def blurred_convolutions(model: torch.nn.Module) -> list[str]:
    """The convolutions BlurPool blurs: every strided one with 16 or more input channels (FFCV's rule: the
    stem's 3-channel conv is left alone). ResNet-50: conv2 and the downsample of layer2-4's first blocks."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and max(m.stride) > 1 and m.in_channels >= 16]


def add_blurpool(model: torch.nn.Module) -> list[str]:
    """BlurPool (Zhang 2019, "Making convolutional networks shift-invariant again"; FFCV's use_blurpool): a
    fixed [1 2 1] x [1 2 1] / 16 depthwise blur, stride 1, in front of each strided convolution, so that
    downsampling does not alias. A forward pre-hook with a non-persistent filter: the state dict stays a
    plain torchvision ResNet's (our checkpoints load anywhere). Returns the blurred convolutions' names."""
    names = blurred_convolutions(model)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16.0)[None, None]
    for name in names:
        conv = model.get_submodule(name)
        conv.register_buffer("blur_filter", kernel.repeat(conv.in_channels, 1, 1, 1), persistent=False)
        conv.register_forward_pre_hook(_blur_input)
    return names


def _blur_input(conv: torch.nn.Conv2d, args):
    (x,) = args
    blur = conv.blur_filter.to(dtype=x.dtype)
    return (torch.nn.functional.conv2d(x, blur, padding=1, groups=conv.in_channels),)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def read_weights_file(path) -> dict:
    """A weights file's contents: one of our checkpoints (a dict with "model") or a torchvision state dict.
    A missing or unreadable file is a UserError naming the fix."""
    from pathlib import Path

    if not Path(path).is_file():
        raise UserError(f"weights file {path} does not exist; pass a checkpoint_*.pt of ours or a torchvision "
                        "state dict (.pth)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"weights file {path} cannot be read ({type(exc).__name__}); pass a .pt/.pth state dict") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path} holds a {type(loaded).__name__}, not a state dict or a checkpoint")
    return loaded


def arch_of_weights(state: dict) -> str | None:
    """The torchvision ResNet (ARCHS) whose parameter and buffer names and shapes, the classifier aside, are
    those of `state` (a state dict; `module.`/`_orig_mod.` prefixes allowed); None if none is. Built on the
    meta device: no memory, a few milliseconds per depth."""
    shapes = {k.removeprefix("module.").removeprefix("_orig_mod."): tuple(getattr(v, "shape", ()))
              for k, v in state.items()}
    shapes = {k: v for k, v in shapes.items() if not k.startswith("fc.")}
    return next((arch for arch in ARCHS if _backbone_shapes(arch) == shapes), None)


@lru_cache(maxsize=None)
def _backbone_shapes(arch: str) -> dict:
    with torch.device("meta"):
        model = build_model(arch, 1, zero_init_residual=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}


def load_state(model: torch.nn.Module, state: dict, path, replace_classifier: bool, fit: str) -> list[str]:
    """Load a state dict read from `path` into `model`; `fit` says what to check when it does not fit.

    With replace_classifier, a classifier (fc) of another shape is left as initialised (fine-tuning for
    C classes); everything else must match. Returns the names left as initialised."""
    # saved from a DDP wrapper or a torch.compile'd module
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    kept = [k for k in ("fc.weight", "fc.bias")
            if replace_classifier and k in state and state[k].shape != own[k].shape]
    for key in kept:
        del state[key]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shapes differ: another depth, or another number of classes
        lines = str(exc).splitlines()
        detail = next((line.strip() for line in lines if "size mismatch" in line),
                      lines[1].strip() if len(lines) > 1 else str(exc))
        raise UserError(f"{path} does not fit this model ({detail}); {fit}") from None
    if set(missing) - set(kept) or unexpected:
        raise UserError(f"{path} does not fit this model: missing {sorted(set(missing) - set(kept))[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}; {fit}")
    return kept


def load_weights(model: torch.nn.Module, path: str, replace_classifier: bool) -> list[str]:
    """Load a torchvision state dict or one of our checkpoints (its raw weights) into `model` (load_state)."""
    loaded = read_weights_file(path)
    state = loaded["model"] if isinstance(loaded.get("model"), dict) else loaded
    return load_state(model, state, path, replace_classifier,
                      f"check --arch / --kd-teacher-arch (the weights must be a {type(model).__name__} of the "
                      "same depth)")
