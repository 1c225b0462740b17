"""Metric code against hand-computed values: an untested meter prints numbers users then quote."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rn50.core.validation import evaluate
from rn50.observe.metrics import MetricsLog, topk_correct


def test_topk_correct_counts_by_hand():
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
        [0.1, 0.9, 0.8, 0.7, 0.6, 0.5],  # label 2: second -> top-5 only
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: sixth -> neither
    ])
    labels = torch.tensor([0, 2, 5])
    assert [int(c) for c in topk_correct(logits, labels)] == [1, 2]
    # fewer than 5 classes: k is capped, top-5 covers every class
    assert [int(c) for c in topk_correct(logits[:, :3], torch.tensor([2, 0, 1]))] == [0, 3]


class Lookup(nn.Module):
    """'Predicts' the class stored in the first pixel, so the expected accuracy is known exactly."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), self.classes).float() * 10 + self.dummy


def test_evaluate_is_exact_over_a_partial_last_batch():
    predicted = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    labels = torch.tensor([0, 1, 1, 0, 2, 2, 1])  # 4 of 7 right
    images = predicted.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    batches = [(images[:3], labels[:3]), (images[3:6], labels[3:6]), (images[6:], labels[6:])]
    result = evaluate(Lookup(3), batches)
    assert result["val/count"] == 7
    assert result["val/top1"] == pytest.approx(100 * 4 / 7)
    assert result["val/top5"] == pytest.approx(100.0)
    # cross-entropy of logits (10 on the predicted class, 0 elsewhere): right -> log(1 + 2e-10)
    right = math.log(1 + 2 * math.exp(-10))
    wrong = 10 + math.log(1 + 2 * math.exp(-10))
    assert result["val/loss"] == pytest.approx((4 * right + 3 * wrong) / 7, rel=1e-5)


def test_metrics_log_writes_only_on_the_main_rank(tmp_path):
    MetricsLog(tmp_path / "a.jsonl", enabled=True).write({"val/top1": 50.0})
    MetricsLog(tmp_path / "b.jsonl", enabled=False).write({"val/top1": 50.0})
    assert (tmp_path / "a.jsonl").read_text() == '{"val/top1": 50.0}\n'
    assert not (tmp_path / "b.jsonl").exists()
