"""SGD with parameter groups: weight decay on conv and linear weights only, none on BN and biases."""

from __future__ import annotations

import torch
from torch import nn

from rn50.recipe import Recipe

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decay (conv/linear weights) and no_decay (every norm parameter and every bias).

    Decided by module type and parameter name, not by tensor rank, so a future 1-d weight of a
    non-norm layer still gets its decay.
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if isinstance(module, _NORMS) or name == "bias" else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    # The LR is set every step by rn50.schedule; fused kernels where CUDA has them.
    fused = next(model.parameters()).is_cuda
    return torch.optim.SGD(
        parameter_groups(model, recipe.weight_decay),
        lr=0.0,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        fused=fused or None,
    )
