"""Is the input pipeline or the model the bottleneck? A verdict per loader, with its evidence and next steps.

Three measurements of the same training step decide it:
- stall: the fraction of the end-to-end window the device waited for input (GPU timeline, or host-side
  on CPU runs);
- ratio: end-to-end img/s over the synthetic-data ceiling (1 - ratio cross-checks the stall);
- headroom: the loader alone (no model) over the ceiling; below 1 the loader cannot keep up even alone.
"""

from __future__ import annotations

# Thresholds, as fractions. A few percent of stall is noise and start-of-step latency; 15% is a loader
# that costs real throughput.
STALL_LOW, STALL_HIGH = 0.05, 0.15
RATIO_HIGH, RATIO_LOW = 0.90, 0.75

NEXT_STEPS = {
    "dali": [
        "raise --hw-decoder-load (A100/H100/H200 hardware JPEG decoder; 0.65-0.9 measured best on H100)",
        "add DALI CPU threads (--dali-threads) and deepen the prefetch queue (--prefetch)",
        "run `python -m benchmarks.run --autotune` to sweep threads, hw_decoder_load and prefetch",
        "reduce JPEG size: pre-resize the dataset so the shorter side is ~256-320 px",
    ],
    "dali-cpu": [
        "switch to the GPU pipeline (--loader dali): nvJPEG and the hardware decoder take decoding off the CPU",
        "add DALI threads (--dali-threads) up to the number of free cores per GPU",
        "reduce JPEG size: pre-resize the dataset so the shorter side is ~256-320 px",
    ],
    "dali-hybrid": [
        "switch to the GPU decoder (--loader dali) where the GPU has a hardware JPEG decoder (A100/H100/H200)",
        "add DALI threads (--dali-threads) up to the free cores per GPU: decoding and cropping run on them",
        "reduce JPEG size: pre-resize the dataset so the shorter side is ~256-320 px",
    ],
    "torchvision-gpu": [
        "switch to DALI (--loader dali): its decode is fused with the crop and shares the hardware decoder",
        "raise --prefetch (batches decoded ahead) and --workers (threads reading the files)",
        "reduce JPEG size: pre-resize the dataset so the shorter side is ~256-320 px",
    ],
    "torchvision": [
        "switch to DALI (--loader dali on GPU, dali-cpu otherwise): threads scale better than worker processes",
        "add DataLoader workers (--workers) up to the free cores per GPU",
        "reduce JPEG size: pre-resize the dataset so the shorter side is ~256-320 px",
    ],
}
COMPUTE_STEPS = [
    "the input pipeline keeps up: speed up the model step instead",
    "try torch.compile, a larger batch per GPU, or bf16 (--amp-dtype bfloat16) and compare",
    "check channels_last and AMP are on (--channels-last --amp), as the recipe defaults",
]


def verdict(loader: str, device_type: str, stall: float | None, ratio: float | None,
            headroom: float | None) -> dict:
    """`stall`, `ratio`, `headroom` as fractions; any may be None when that mode was not measured."""
    compute_label = "GPU-bound" if device_type == "cuda" else "compute-bound"
    evidence = []
    if stall is not None:
        evidence.append(f"input stall {stall:.1%} of the end-to-end window")
    if ratio is not None:
        evidence.append(f"end-to-end at {ratio:.1%} of the synthetic-data ceiling (1 - ratio = {1 - ratio:.1%})")
        if ratio > 1:
            evidence.append("a ratio above 100% is measurement noise: more --steps and --repeats tighten it")
    if headroom is not None:
        evidence.append(f"the loader alone delivers {headroom:.2f}x the ceiling's img/s")
    if device_type != "cuda":
        evidence.append("CPU run: loader and model share the same cores, so the figures interact")
    if stall is None and ratio is None and headroom is None:
        return {"verdict": "not available", "evidence": ["measure the train mode (and synthetic) for a verdict"],
                "next_steps": []}

    input_signs = [stall is not None and stall >= STALL_HIGH, ratio is not None and ratio < RATIO_LOW,
                   headroom is not None and headroom < 1.0]
    compute_signs = [stall is None or stall < STALL_LOW, ratio is None or ratio >= RATIO_HIGH,
                     headroom is None or headroom >= 1.0]
    if any(input_signs):
        label, steps = "input-bound", NEXT_STEPS.get(loader, [])
    elif all(compute_signs):
        label, steps = compute_label, COMPUTE_STEPS
    else:
        label = "balanced"
        steps = ["the loader and the model are close: both changes below pay a little"] + \
            NEXT_STEPS.get(loader, [])[:1] + COMPUTE_STEPS[1:2]
    return {"verdict": label, "evidence": evidence, "next_steps": steps}
