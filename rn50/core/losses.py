"""Losses beyond cross-entropy: knowledge distillation, and the batch mixing that makes soft targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, hard_loss: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student, both softened by T) + (1 - alpha) * hard_loss.

    T^2 keeps the soft term's gradients on the same scale as the hard term's whatever T is (Hinton et
    al., 2015). Computed in fp32 whatever the autocast dtype."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True)
    return alpha * t * t * soft + (1 - alpha) * hard_loss


def batch_mixing(mixup_alpha: float, cutmix_alpha: float, num_classes: int):
    """torchvision's MixUp and/or CutMix on the whole batch on its device (one of the two at random per
    batch when both are on); targets become class probabilities. None when both are off."""
    choices = []
    if mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
