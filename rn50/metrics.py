"""Counting and logging: top-k counts, the metrics.jsonl writer (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top k logits, for each k (counts, not percentages,
    so they can be summed over ranks). k is capped at the number of classes."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return [hits[:, :k].any(dim=1).sum() for k in ks]


class MetricsLog:
    """Appends one flat JSON object per line to metrics.jsonl; names are slash-separated
    (`train/loss`, `val/top1`) and double as TensorBoard tags. Only the main rank writes."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
