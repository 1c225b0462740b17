"""Model FLOPs utilisation: FLOPs counted on the real model, divided by the GPU's peak.

FLOPs per image are counted with torch.utils.flop_counter on the model at the benchmark's resolution,
forward plus backward (ResNet-50 at 224: 8.18 forward, 24.3 forward+backward GFLOPs; "8.2 GFLOPs for a
training step" is the forward pass alone, 3x too low). The count runs on the meta device: shapes only,
no arithmetic, so it is instant and needs no GPU memory.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from rn50.core.model import add_blurpool, build_model

# Peak dense tensor throughput, TFLOP/s, fp16/bf16 inputs (docs/design.md#peak-tensor-throughput-for-mfu).
# Matched against the CUDA device name in order: more specific names first ("H100 PCIe" before "H100",
# "A100" before "A10").
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("RTX 4090", 165.0),  # fp32 accumulate, as AMP uses
    ("RTX 3090", 71.0),  # fp32 accumulate (142 with fp16 accumulate, which AMP does not use)
    ("L40S", 362.0),
)


def flops_per_image(arch: str, image_size: int, num_classes: int = 1000, training: bool = True,
                    blurpool: bool = False) -> float:
    """FLOPs for one image: forward, plus backward when `training` (batch of 2, divided by 2); with
    `blurpool`, the blurs in front of the strided convolutions too."""
    batch = 2
    with torch.device("meta"):
        model = build_model(arch, num_classes)
        if blurpool:
            add_blurpool(model)
        images = torch.empty(batch, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(images)
        if training:
            out.sum().backward()
    return counter.get_total_flops() / batch


def peak_tflops(device_name: str | None) -> float | None:
    """The table's peak for this GPU, or None: no GPU, or a GPU the table does not know (no guessing)."""
    if not device_name:
        return None
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return tflops
    return None


def mfu(img_per_s_per_gpu: float, flops_per_img: float, peak_tflops_per_gpu: float | None) -> float | None:
    """Fraction (0-1) of the GPU's peak that the counted model FLOPs use at this throughput."""
    if not peak_tflops_per_gpu:
        return None
    return img_per_s_per_gpu * flops_per_img / (peak_tflops_per_gpu * 1e12)
