"""Which dtype the model computes in, and which dtype the input batch must have for it.

One rule for training, validation and the benchmark harness, so a loader never hands the model a batch
of another dtype than the step expects ("Input type (c10::Half) and weight type (float)").
"""

from __future__ import annotations

import torch


def autocast_dtype(amp: bool, amp_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the training step, or None for plain fp32.

    - CUDA: float16 (with GradScaler) or bfloat16, as asked.
    - The CPU: bfloat16 when asked for (torch's CPU autocast; fast where the CPU has AVX512-BF16 or AMX);
      float16, the default, stays fp32 there (fp16 convolutions on most CPUs are slower than fp32), and
      `precision_note` says so.
    """
    if not amp:
        return None
    if torch.device(device).type == "cuda" or amp_dtype == "bfloat16":
        return getattr(torch, amp_dtype)
    return None


def precision_note(amp: bool, amp_dtype: str, device: torch.device) -> str | None:
    """The start-up line for an AMP setting that this device does not run, so no request goes unanswered."""
    if amp and autocast_dtype(amp, amp_dtype, device) is None:
        return (f"AMP {amp_dtype} runs on CUDA GPUs only: this run computes in fp32 on the "
                f"{torch.device(device).type.upper()} (--amp-dtype bfloat16 autocasts there; --no-amp asks for fp32 "
                f"and drops this line)")
    return None


def batch_dtype(autocast: torch.dtype | None) -> torch.dtype:
    """The dtype the loaders deliver images in.

    - No autocast (fp32 model: `--no-amp`, or float16 AMP asked of the CPU): float32, the model's own dtype.
    - float16 autocast: float16, the dtype the first convolution casts to anyway, at half the bytes.
    - bfloat16 autocast: float16 too. DALI has no bfloat16 output, and normalised pixels (about -2.2..2.7)
      fit fp16, whose 10-bit mantissa is finer than bf16's 7: autocast's cast to bf16 at the first
      convolution gives what a cast from fp32 gives (bar rare ties, one bf16 step apart), for half the bytes.
    """
    return torch.float32 if autocast is None else torch.float16
