"""Which dtype the model computes in, and which dtype the input batch must have for it.

One rule for training, validation and the benchmark harness, so a loader never hands the model a batch
of another dtype than the step expects ("Input type (c10::Half) and weight type (float)").
"""

from __future__ import annotations

import torch


def autocast_dtype(amp: bool, amp_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the training step, or None for plain fp32. AMP runs on CUDA only: the CPU
    path stays fp32 (fp16 convolutions on the CPU are slow or missing)."""
    return getattr(torch, amp_dtype) if amp and torch.device(device).type == "cuda" else None


def batch_dtype(autocast: torch.dtype | None) -> torch.dtype:
    """The dtype the loaders deliver images in.

    - No autocast (fp32 model, `--no-amp` or the CPU): float32, the model's own dtype.
    - float16 autocast: float16, the dtype the first convolution casts to anyway, at half the bytes.
    - bfloat16 autocast: float16 too. DALI has no bfloat16 output, and normalised pixels (about -2.2..2.7)
      fit fp16, whose 10-bit mantissa is finer than bf16's 7: autocast's cast to bf16 at the first
      convolution gives what a cast from fp32 gives (bar rare ties, one bf16 step apart), for half the bytes.
    """
    return torch.float32 if autocast is None else torch.float16
