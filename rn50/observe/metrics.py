"""Counting and logging: top-k counts, the metrics.jsonl writer (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines.augmentation import MEAN, STD


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top k logits, for each k (counts, not percentages,
    so they can be summed over ranks). k is capped at the number of classes."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return [hits[:, :k].any(dim=1).sum() for k in ks]


class MetricsLog:
    """Appends one flat JSON object per line to metrics.jsonl; names are slash-separated
    (`train/loss`, `val/top1`) and are the TensorBoard tags too, when `tensorboard_dir` is given (every
    numeric value of a record becomes a scalar at the record's step). Only the main rank writes. `tracker`
    (rn50.observe.tracking, --tracker): every record goes to it too, under the same names, after the local files."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None, tracker=None):
        self.path, self.enabled = Path(path), enabled
        self.tracker = tracker
        self.writer = None
        if enabled and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ("step", "epoch"):
                    self.writer.add_scalar(name, value, record["step"])
            self.writer.flush()
        if self.tracker is not None:  # last: a tracker never raises, and the local files are written first
            self.tracker.log_metrics(record, record["step"])

    def images(self, tag: str, images: torch.Tensor, step: int, count: int = 16,
               normalize: tuple[float, ...] = MEAN + STD) -> None:
        """A grid of (augmented, normalised) input images, brought back to 0-1 for display; `normalize` is the
        recipe's augmentation.normalize (MEAN x3, STD x3), the one the loaders applied."""
        if self.writer is None:
            return
        import torchvision

        batch = images[:count].detach().float().cpu()
        mean = torch.tensor(normalize[:3]).view(1, 3, 1, 1)
        std = torch.tensor(normalize[3:]).view(1, 3, 1, 1)
        grid = torchvision.utils.make_grid((batch * std + mean).clamp(0, 1), nrow=8)
        self.writer.add_image(tag, grid, step)
