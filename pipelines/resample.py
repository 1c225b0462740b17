"""Many resized crops at once: torchvision's antialiased bilinear resize as batched matrix products.

A resize is separable: `out = Wy @ image @ Wx.T`, where row k of `Wy` holds the filter taps of output row k
(zero outside them). The taps are computed exactly as PyTorch's antialiased bilinear kernel computes them
(`interpolate(..., mode="bilinear", antialias=True)`, which torchvision's Resize and RandomResizedCrop use):
a triangle filter widened by the scale when shrinking, clipped to the image and normalised. So a batch of
crops of different sizes, each resized to its own size and windowed (a centre crop after the resize), is
two `matmul`s over a zero-padded batch, on tensor cores on a GPU, instead of a Python loop of one small
resize kernel per image. Padding wastes work on images of very different sizes, so the batch is cut into
groups of similar size, each under a memory budget.
"""

from __future__ import annotations

import warnings

import torch

# Elements (channels x padded height x padded width x images) of one group's float32 padded batch: 256 Mi
# elements is 1 GiB. ImageNet crops are a few hundred pixels a side, so a batch of 256 is one or two groups.
GROUP_BUDGET = 1 << 28


def axis_weights(length: torch.Tensor, resized: torch.Tensor, first: torch.Tensor, count: int,
                 padded: int) -> torch.Tensor:
    """[n, count, padded] float32: for each of n images, the taps of output pixels first..first+count-1
    along one axis, when `length` source pixels are resized to `resized` (PyTorch's antialiased bilinear
    weights: centre (k + 0.5) * scale, support max(scale, 1), taps clipped to the image, normalised).
    Computed in float32 on the inputs' device, as PyTorch's float kernels compute them."""
    length, resized, first = (t.to(torch.float32)[:, None, None] for t in (length, resized, first))
    scale = length / resized
    support = scale.clamp(min=1.0)
    inv_scale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    out = first + torch.arange(count, dtype=torch.float32, device=length.device)[None, :, None]
    centre = scale * (out + 0.5)
    low = torch.trunc(centre - support + 0.5).clamp(min=0)  # PyTorch truncates toward zero, then clips
    high = torch.minimum(torch.trunc(centre + support + 0.5), length)
    source = torch.arange(padded, dtype=torch.float32, device=length.device)[None, None, :]
    taps = (1.0 - ((source - centre + 0.5) * inv_scale).abs()).clamp(min=0.0)
    taps = torch.where((source >= low) & (source < high), taps, torch.zeros_like(taps))
    return taps / taps.sum(-1, keepdim=True)


def size_groups(shapes: list[tuple[int, int]], channels: int, budget: int = GROUP_BUDGET) -> list[list[int]]:
    """Indices grouped by size, largest first, so that each group's padded batch stays under `budget`
    elements (a group always takes at least one image)."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i], reverse=True)
    groups: list[list[int]] = []
    height = width = 0
    for i in order:
        h, w = max(height, shapes[i][0]), max(width, shapes[i][1])
        if groups and (len(groups[-1]) + 1) * channels * h * w <= budget:
            groups[-1].append(i)
            height, width = h, w
        else:
            groups.append([i])
            height, width = shapes[i]
    return groups


def padded_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """[n, C, Hmax, Wmax] float32, zero-padded at the bottom and right, from CHW tensors of any sizes:
    one nested-tensor conversion instead of a copy per image."""
    with warnings.catch_warnings():  # the strided nested layout is the one with two ragged dimensions
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
        nested = torch.nested.nested_tensor(images)
        if nested.is_cuda:  # CUDA pads floating-point nested tensors in one kernel (uint8: one per image)
            return nested.to(torch.float32).to_padded_tensor(0.0)
        return nested.to_padded_tensor(0).to(torch.float32)  # the CPU pads uint8 a third faster


def resized_crops(crops: list[torch.Tensor], resized: torch.Tensor, offsets: torch.Tensor, size: int,
                  budget: int = GROUP_BUDGET) -> torch.Tensor:
    """[n, C, size, size] float32 pixels (0-255, rounded as PyTorch rounds a uint8 resize).

    crops: n uint8 CHW tensors (views into decoded images: slicing a crop costs nothing), all on one device.
    resized: [n, 2] (height, width) each crop is resized to; offsets: [n, 2] (top, left) of the size x size
    window kept from the resized crop. RandomResizedCrop: resized = (size, size), offsets 0. Validation:
    resized = shorter side to 256, offsets = the centre crop's corner."""
    device, channels = crops[0].device, crops[0].shape[0]
    out = torch.empty(len(crops), channels, size, size, device=device)
    shapes = [tuple(c.shape[1:]) for c in crops]
    # the few numbers per image travel to the device once; the weights are computed there
    lengths = torch.tensor(shapes).to(device, non_blocking=True)
    resized, offsets = resized.to(device, non_blocking=True), offsets.to(device, non_blocking=True)
    for group in size_groups(shapes, channels, budget):
        batch = padded_batch([crops[i] for i in group])
        index = torch.tensor(group).to(device, non_blocking=True)
        rows = axis_weights(lengths[index, 0], resized[index, 0], offsets[index, 0], size, batch.shape[2])
        cols = axis_weights(lengths[index, 1], resized[index, 1], offsets[index, 1], size, batch.shape[3])
        # Horizontal pass, rounded to whole levels, then vertical: the order and rounding of PyTorch's uint8
        # resize (torchvision's Resize on a decoded image), which one rounding at the end misses on about
        # a fifth of the pixels by one level. Every channel of a crop shares its weights.
        across = (batch @ cols[:, None].transpose(-1, -2)).round_().clamp_(0, 255)  # [g, C, H, size]
        out[index] = rows[:, None] @ across  # [g, 1, size, H] @ [g, C, H, size]
    return out.round_().clamp_(0, 255)
