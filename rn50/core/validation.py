"""Validation: exact top-1/top-5 over the whole validation set, counts summed over ranks.

`evaluate()` is training's validation after each epoch (rn50.train) and the evaluation command's
(`python -m rn50.evaluate`, which adds its confusion matrix and per-class report around it). It lives in the
core, below the entry points, so that neither command imports the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rn50.observe.metrics import topk_correct
from rn50.system.dist import all_reduce_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, amp_dtype: torch.dtype | None = None, on_batch=None,
             flip: bool = False, confusion: torch.Tensor | None = None) -> dict:
    """`model` must be the unwrapped model (not DDP): ranks may hold different numbers of batches.
    `flip`: test-time flip averaging, the mean of the logits of each image and its mirror image.
    `confusion`: a [C, C] int64 tensor on the model's device, or None; this rank's images are added to it
    (row: true class, column: top-1 prediction). Not reduced here: the caller all-reduces it.

    Every rank sums loss, correct counts and images; one all-reduce adds them up, so val/count is
    the validation set's size and the percentages are exact, never averages of per-rank averages.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Nothing in the loop waits for the device: the sums stay there, the image count on the host (a tensor
    # made from it each batch would be a host-to-device copy), the confusion matrix a fixed-size scatter-add
    # (CUDA's bincount reads its input's maximum on the host to size its output).
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    seen = 0
    for batch, (images, labels) in enumerate(loader):
        if on_batch is not None:
            on_batch(batch)  # progress for the hang watchdog
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
            if flip:  # images are NCHW (channels-last memory): dim 3 is the width
                logits = (logits.float() + model(torch.flip(images, dims=[3])).float()) / 2
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        top1, top5 = topk_correct(logits, labels)
        if confusion is not None:
            classes = confusion.shape[0]
            cells = labels * classes + logits.argmax(dim=1)
            confusion.view(-1).scatter_add_(0, cells, torch.ones_like(cells))
        sums[:3] += torch.stack([loss.double(), top1.double(), top5.double()])
        seen += len(labels)
    sums[3] = seen  # a scalar fill, once
    loss, top1, top5, count = all_reduce_sum(sums).tolist()
    model.train(was_training)
    if count == 0:
        raise RuntimeError("validation saw no images")
    return {"val/loss": loss / count, "val/top1": 100.0 * top1 / count, "val/top5": 100.0 * top5 / count,
            "val/count": int(count)}
