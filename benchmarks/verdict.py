"""Is the input pipeline or the model the bottleneck? A verdict per loader, with its evidence and next steps.

Three measurements of the same training step decide it:
- stall: the fraction of the end-to-end window the device waited for input (GPU timeline, or host-side
  on CPU runs);
- ratio: end-to-end img/s over the synthetic-data ceiling (1 - ratio cross-checks the stall);
- headroom: the loader alone (no model) over the ceiling; below 1 the loader cannot keep up even alone.

Ratios count only beyond their noise (benchmarks.noise, the one rule of the report): within it the verdict is
"within noise"; end to end above the ceiling beyond it is a "measurement error", never a faster loader.
"""

from __future__ import annotations

from pipelines.registry import REGISTRY

# Thresholds, as fractions. A few percent of stall is noise and start-of-step latency; 15% is a loader
# that costs real throughput.
STALL_LOW, STALL_HIGH = 0.05, 0.15
RATIO_HIGH, RATIO_LOW = 0.90, 0.75

COMPUTE_STEPS = [
    "the input pipeline keeps up: speed up the model step instead",
    "try torch.compile, a larger batch per GPU, or bf16 (--amp-dtype bfloat16) and compare",
    "check channels_last and AMP are on (--channels-last --amp), as the recipe defaults",
]
CPU_COMPUTE_STEPS = [
    "the input pipeline keeps up: speed up the model step instead",
    "try torch.compile or a larger batch and compare; on the CPU the step runs in fp32, so a CUDA GPU is the "
    "change that pays most",
]
NOISE_STEPS = ["measure longer: more --steps and --repeats narrow the rounds' spread until the figures can decide"]
ERROR_STEPS = ["rerun on an idle machine (the report's first lines name what ran beside this one), with more --steps "
               "and --repeats: the training step cannot run faster fed by a loader than on a resident batch"]
MEASUREMENT_ERROR = "measurement error"


def next_steps(loader: str, device_type: str) -> list[str]:
    """What to change when `loader` is the bottleneck on this kind of device: its registry record's advice
    (pipelines.registry.LoaderKind.advice_gpu / advice_cpu; none for synthetic data or an unknown name)."""
    record = REGISTRY.get(loader)
    if record is None:
        return []
    return list(record.advice_gpu if device_type == "cuda" else record.advice_cpu)


def _sign(value: float | None, high: float, low: float, noise: float) -> str | None:
    """"compute" at or above `high`; "noise" below it but within `noise` (benchmarks.noise) of 1;
    "input" below `low`; "between" otherwise; None when not measured."""
    if value is None:
        return None
    if value >= high:
        return "compute"
    if 1 - value <= noise:
        return "noise"
    return "input" if value < low else "between"


def verdict(loader: str, device_type: str, stall: float | None, ratio: float | None,
            headroom: float | None, ratio_spread: float | None = None, headroom_spread: float | None = None) -> dict:
    """`stall`, `ratio`, `headroom` as fractions; any may be None when that mode was not measured.
    `ratio_spread`, `headroom_spread`: the ratios' noise (benchmarks.noise.compare: the rounds' ratios' spread,
    at least its floor); None when it is unknown (one round).

    The stall is the direct evidence (the model waited for input, or it did not); the ratio and the headroom
    confirm it, and count only where they differ from the ceiling beyond their noise. A verdict the figures
    cannot support is "within noise"; end to end above the ceiling beyond the noise is a "measurement error"
    (the step cannot run faster fed by a loader than on a resident batch); a step that never waits yet runs
    well below the ceiling beside a loader that alone outruns it is "contended" (the loader's work slows the
    step), never input-bound.
    """
    compute_label = "GPU-bound" if device_type == "cuda" else "compute-bound"
    compute_steps = COMPUTE_STEPS if device_type == "cuda" else CPU_COMPUTE_STEPS
    if stall is None and ratio is None and headroom is None:
        return {"verdict": "not available", "evidence": ["measure the train mode (and synthetic) for a verdict"],
                "next_steps": []}
    ratio_sign = _sign(ratio, RATIO_HIGH, RATIO_LOW, ratio_spread or 0.0)
    headroom_sign = _sign(headroom, 1.0, 1.0, headroom_spread or 0.0)
    evidence = []
    if stall is not None:
        evidence.append(f"input stall {stall:.1%} of the end-to-end window")
    above = ratio is not None and ratio > 1
    error = above and ratio_spread is not None and ratio - 1 > ratio_spread
    if ratio is not None:
        evidence.append(f"end-to-end at {ratio:.1%} of the synthetic-data ceiling (1 - ratio = {1 - ratio:.1%})"
                        + (f": within noise ({ratio_spread:.1%}) of the ceiling"
                           if ratio_spread is not None and abs(1 - ratio) <= ratio_spread else ""))
        if error:
            evidence.append(f"above the ceiling beyond the noise ({ratio_spread:.1%}): a measurement error, not a "
                            "faster loader (one of the two rows ran under other conditions)")
        elif above:
            evidence.append("above the ceiling, within noise" if ratio_spread is not None else
                            "above the ceiling with the noise unknown (one round)")
    if headroom is not None:
        evidence.append(f"the loader alone delivers {headroom:.2f}x the ceiling's img/s"
                        + (f", within noise ({headroom_spread:.1%}) of it" if headroom_sign == "noise" else ""))
    spreads = [s for s in (ratio_spread, headroom_spread) if s is not None]
    if (ratio is not None or headroom is not None) and not spreads:
        evidence.append("one round: the noise is unknown, so no difference counts (measure with --repeats 2 or more)")
    if device_type != "cuda":
        evidence.append("CPU run: loader and model share the same cores, so the figures interact")

    if error:
        label = MEASUREMENT_ERROR
    elif stall is not None and stall >= STALL_HIGH:
        label = "input-bound"
    elif stall is None or stall < STALL_LOW:  # the model (hardly) waited for input, or the stall is unknown
        if ratio_sign == "input" or ratio_sign == "between":
            if headroom_sign == "input" or stall is None:
                label = "input-bound"
            else:
                label = "contended" if ratio_sign == "input" else "balanced"
        elif ratio_sign == "noise" or (headroom_sign == "noise" and ratio_sign is None):
            label = "within noise"
        elif headroom_sign == "input" and ratio_sign is None:  # loader mode alone: it cannot keep up
            label = "input-bound"
        elif headroom_sign == "input":  # the loader alone is slower, yet the step neither waits nor slows
            label = "within noise"
            evidence.append("the figures disagree: the loader alone is slower than the ceiling, yet the step "
                            "neither waits nor slows")
        else:
            label = compute_label
    else:  # some stall, under STALL_HIGH
        if ratio_sign == "input" or headroom_sign == "input":
            label = "input-bound"
        elif ratio_sign == "noise":
            label = "within noise"
        else:
            label = "balanced"

    if label == MEASUREMENT_ERROR:
        steps = ERROR_STEPS
    elif label == "input-bound":
        steps = next_steps(loader, device_type)
    elif label == compute_label:
        steps = compute_steps
    elif label == "contended":
        shared = "cores" if device_type != "cuda" else "GPU"
        evidence.append("the step never waits for input, yet runs below the ceiling"
                        + (" while the loader alone outruns it" if headroom is not None else "")
                        + f": the loader's own work takes the {shared} the step needs")
        steps = ([f"leave the model more {shared}: fewer loader threads (--dali-threads, --workers), or a CUDA GPU"]
                 if device_type != "cuda" else []) + next_steps(loader, device_type)[:2]
    elif label == "within noise":
        steps = NOISE_STEPS
    else:
        steps = ["the loader and the model are close: both changes below pay a little"] + \
            next_steps(loader, device_type)[:1] + compute_steps[1:2]
    return {"verdict": label, "evidence": evidence, "next_steps": steps}
