"""Validation: exact top-1/top-5 over the whole validation set, counts summed over ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rn50.dist import all_reduce_sum
from rn50.metrics import topk_correct


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, amp_dtype: torch.dtype | None = None, on_batch=None,
             flip: bool = False) -> dict:
    """`model` must be the unwrapped model (not DDP): ranks may hold different numbers of batches.
    `flip`: test-time flip averaging, the mean of the logits of each image and its mirror image.

    Every rank sums loss, correct counts and images; one all-reduce adds them up, so val/count is
    the validation set's size and the percentages are exact, never averages of per-rank averages.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    for batch, (images, labels) in enumerate(loader):
        if on_batch is not None:
            on_batch(batch)  # progress for the hang watchdog
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
            if flip:  # images are NCHW (channels-last memory): dim 3 is the width
                logits = (logits.float() + model(torch.flip(images, dims=[3])).float()) / 2
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        top1, top5 = topk_correct(logits, labels)
        sums += torch.stack([loss.double(), top1.double(), top5.double(), sums.new_tensor(len(labels))])
    loss, top1, top5, count = all_reduce_sum(sums).tolist()
    model.train(was_training)
    if count == 0:
        raise RuntimeError("validation saw no images")
    return {"val/loss": loss / count, "val/top1": 100.0 * top1 / count, "val/top5": 100.0 * top5 / count,
            "val/count": int(count)}
