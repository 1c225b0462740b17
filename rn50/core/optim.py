"""SGD with parameter groups: weight decay on conv and linear weights only, none on BN and biases."""

from __future__ import annotations

import torch
from torch import nn

from rn50.config.recipe import Optimisation

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, weight_decay: float, head: nn.Module | None = None) -> list[dict]:
    """Groups by decay: conv/linear weights decay, every norm parameter and every bias does not.

    Decided by module type and parameter name, not by tensor rank, so a future 1-d weight of a
    non-norm layer still gets its decay. With `head` (the classifier), its parameters get groups of their
    own marked "head", so fine-tuning can freeze the backbone by LR alone (rn50.core.schedule.set_lr).
    """
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    groups = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            decays = not (isinstance(module, _NORMS) or name == "bias")
            in_head = id(param) in head_params
            key = ("decay" if decays else "no_decay") + ("_head" if in_head else "")
            groups.setdefault(key, {"params": [], "weight_decay": weight_decay if decays else 0.0, "name": key,
                                    "head": in_head})["params"].append(param)
    order = ("decay", "no_decay", "decay_head", "no_decay_head")
    return [groups[key] for key in order if key in groups]


def build_optimizer(model: nn.Module, optimisation: Optimisation, head: nn.Module | None = None,
                    fused: bool = True) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (the recipe's), AdamW (torch) or LAMB (timm's, a well-kept
    implementation). The LR is set every step by rn50.core.schedule.

    `fused`: torch's fused kernels for SGD and AdamW (one launch for all parameters). Where they run is the
    caller's policy (rn50.core.step.build_training: on CUDA, as the machine's fused_optimizer says; the CPU
    runs the for-each kernels); torch has them on the CPU too, where the tests run the GPU's optimizer."""
    opt = optimisation
    groups = parameter_groups(model, opt.weight_decay, head)
    fused = fused or None  # None, not False: False would also turn torch's for-each kernels off on CUDA
    if opt.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, fused=fused)
    if opt.optimizer == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=0.0)
    sgd = torch.optim.SGD(groups, lr=0.0, momentum=opt.momentum, nesterov=opt.nesterov, fused=fused)
    sgd.register_step_pre_hook(zero_momentum_before_first_step)
    return sgd


def zero_momentum_before_first_step(optimizer: torch.optim.SGD, args, kwargs) -> None:
    """Gives every parameter about to be stepped a zero momentum buffer where it has none yet.

    torch's fused SGD creates the buffers with `empty_like` on the first step and lets its kernel fill them,
    but the kernel returns early when GradScaler found an inf: after an overflowing first step (routine at
    the scaler's initial 2^16) the buffers keep uninitialised memory, and step 2 writes huge or NaN weights.
    A zero buffer gives what torch's first-step rule gives (buf = grad; dampening is 0 here) on every path,
    fused, for-each or captured in a CUDA graph, and an overflowing step leaves it zero. Run as a step
    pre-hook, so it also covers a state loaded from a checkpoint that was taken before any step."""
    for group in optimizer.param_groups:
        if not group["momentum"]:
            continue
        for param in group["params"]:
            if param.grad is not None and optimizer.state[param].get("momentum_buffer") is None:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
