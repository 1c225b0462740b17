"""The report's figures derived from the measured rows: MFU, the verdict and ratio to the ceiling per loader,
the time a 90-epoch ImageNet run (or the recipe's own schedule) would take, the FLOPs block, and the
time-to-accuracy of finished training runs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.flops import flops_per_image, mfu, peak_tflops
from benchmarks.noise import busy, compare, windows
from benchmarks.plan import Plan
from benchmarks.recommend import ratios_to_dali, recommend
from benchmarks.verdict import verdict
from rn50.system.load import merge as merge_load
from rn50.config.errors import UserError
from rn50.config.recipe import Recipe, resolve
from rn50.system.dist import DistEnv

IMAGENET_TRAIN, IMAGENET_VAL, RECIPE_EPOCHS = 1_281_167, 50_000, 90


def derive(results: list[dict], plan: Plan, env: DistEnv, flops: dict, device_type: str) -> dict:
    """MFU per measurement; stall, ratio to the ceiling, verdict and 90-epoch time per loader."""
    by = {(r["mode"], r["loader"]): r for r in results}
    for r in results:
        r["mfu"] = mfu(r["img_per_s_per_gpu"], flops["per_image_train"], flops["peak_tflops"]) \
            if r["mode"] != "loader" else None
        r["confidence"] = "low" if busy(r) else "normal"
    ceiling = by.get(("synthetic", "synthetic"))
    verdicts, estimates = {}, {}
    for name in plan.loaders:
        train, alone = by.get(("train", name)), by.get(("loader", name))
        stall = train["stall"]["fraction"] if train else None
        # each round's row over the same round's ceiling: the machine's drift cancels in each ratio
        to_ceiling = compare(windows(train), windows(ceiling)) if train and ceiling else {}
        alone_to_ceiling = compare(windows(alone), windows(ceiling)) if alone and ceiling else {}
        ratio, headroom = to_ceiling.get("ratio"), alone_to_ceiling.get("ratio")
        judged = verdict(name, device_type, stall, ratio, headroom, ratio_spread=to_ceiling.get("noise"),
                         headroom_spread=alone_to_ceiling.get("noise"))
        touched = [f"{r['mode']} {r['loader']}" for r in (train, alone, ceiling) if r and busy(r)]
        if touched:  # the figures stand, but what decided the verdict may not be this machine's alone
            judged["evidence"].append(f"measured while other work ran ({', '.join(touched)}): low confidence, "
                                      "see the report's first lines")
        verdicts[name] = {**judged, "confidence": "low" if touched else "normal", "stall_fraction": stall,
                          "stall_basis": train["stall"]["basis"] if train else None,
                          "ratio_to_synthetic": ratio, "ratio_noise": to_ceiling.get("noise"),
                          "stall_cross_check": 1 - ratio if ratio is not None else None,
                          "loader_headroom": headroom}
        if train:
            estimates[name] = time_to_train(train["img_per_s"])
    if ceiling:
        estimates["synthetic"] = time_to_train(ceiling["img_per_s"])
    to_dali = ratios_to_dali(results)
    ratios = {}
    for faster in ("dali", "dali-cpu"):
        pair = {mode: by[(mode, faster)]["img_per_s"] / by[(mode, "torchvision")]["img_per_s"]
                for mode in ("loader", "train") if (mode, faster) in by and (mode, "torchvision") in by}
        if pair:
            ratios[f"{faster}/torchvision"] = pair
    return {"load": machine_load(results), "verdicts": verdicts, "time_to_train_90_epochs": estimates,
            "ratios": ratios, "ratios_to_dali": to_dali,
            "recommendation": recommend(results, verdicts, to_dali, device_type, env.world_size)}


def machine_load(results: list[dict]) -> dict:
    """The run's load beside the job, for the report's first lines: busy when any row was, the rows it touched,
    and why (each kind of reason once, at its worst over every row's windows); what could not be measured, and
    why not."""
    loads = [r.get("load") or {} for r in results]
    measured = [load for load in loads if load]
    why = merge_load(measured)["why"] if measured else []  # each kind of reason once, at its worst
    return {"busy": any(load.get("busy") for load in loads),
            "busy_rows": [f"{r['mode']} {r['loader']}" for r in results if busy(r)], "why": why,
            "cpu_measured": any(load.get("available") for load in loads),
            "gpu_measured": any(load.get("gpu_available") for load in loads),
            "not_measured": sorted({load[key] for load in loads for key in ("reason", "gpu_reason")
                                    if load.get(key)})}


def time_to_train(img_per_s: float) -> dict:
    """A 90-epoch ImageNet run at this throughput (so at the benchmark's resolution and batch). Validation
    is assumed 3x faster than training (forward only: 8.18 of 24.3 GFLOPs), so its hours are an estimate."""
    train_h = RECIPE_EPOCHS * IMAGENET_TRAIN / img_per_s / 3600
    val_h = RECIPE_EPOCHS * IMAGENET_VAL / (3 * img_per_s) / 3600
    return {"train_hours": train_h, "validation_hours_estimated": val_h, "total_hours": train_h + val_h,
            "epochs": RECIPE_EPOCHS, "train_images": IMAGENET_TRAIN, "val_images": IMAGENET_VAL}


def time_to_train_schedule(recipe: Recipe, rows: list[dict]) -> dict:
    """The recipe's own schedule on ImageNet (its epochs, each at its training resolution) at the img/s
    measured at each resolution, per loader. Validation as time_to_train estimates it, scaled by the
    validation resolution's pixels and by 2 with flip averaging."""
    aug, epochs = recipe.augmentation, recipe.schedule.epochs
    sizes = aug.train_sizes(epochs)
    estimates = {}
    for loader in dict.fromkeys(r["loader"] for r in rows):
        speed = {r["image_size"]: r["img_per_s"] for r in rows if r["loader"] == loader}
        if not set(sizes) <= set(speed):
            continue
        train_h = sum(IMAGENET_TRAIN / speed[size] for size in sizes) / 3600
        first = aug.train_size(0)
        val_h = epochs * IMAGENET_VAL / (3 * speed[first]) * (aug.val_size / first) ** 2 \
            * (2 if aug.val_flip else 1) / 3600
        estimates[loader] = {"train_hours": train_h, "validation_hours_estimated": val_h,
                             "total_hours": train_h + val_h, "epochs": epochs,
                             "epochs_per_resolution": {size: sizes.count(size) for size in sorted(set(sizes))}}
    return {"per_resolution": rows, "estimates": estimates}


def time_to_accuracy(run_dirs: Sequence[Path]) -> list[dict]:
    """DAWNBench style: for each training run that reached its --target-top1, the wall time and epochs
    it took, beside its throughput and hardware (from its summary.json)."""
    rows = []
    for run_dir in run_dirs:
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            what = "has no summary.json (not finished?)" if run_dir.is_dir() else "does not exist"
            raise UserError(f"--training-runs: {run_dir} {what}; pass finished rn50.train run folders")
        try:
            summary = json.loads(summary_path.read_text())
            target = summary.get("target")
            rows.append({"run": str(run_dir),
                         "target_top1": resolve(saved=summary["recipe"]).recipe.stopping.target_top1 or None,
                         "reached": target is not None, "time_s": target["time_s"] if target else None,
                         "epochs": target["epochs"] if target else None, "best_top1": summary["best/val_top1"],
                         "img_per_s": summary["train/img_per_s"], "world_size": summary["world_size"],
                         "gpu": summary["environment"]["gpu"]})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"--training-runs: {summary_path} is not an rn50.train summary ({type(exc).__name__}: "
                            f"{exc}); pass finished rn50.train run folders") from None
    return rows


def flops_block(recipe: Recipe, num_classes: int, override: float | None) -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    table = peak_tflops(gpu)
    peak = override or table
    if override:
        source = "--peak-tflops"
    elif table:
        source = f"table ({gpu})"
    else:
        source = "not available: no GPU" if gpu is None else \
            f"not available: {gpu} is not in the table; pass --peak-tflops"
    arch, size = recipe.model.arch, recipe.augmentation.image_size
    blur = recipe.model.blurpool
    return {"per_image_train": flops_per_image(arch, size, num_classes, blurpool=blur),
            "per_image_forward": flops_per_image(arch, size, num_classes, training=False, blurpool=blur),
            "counted_with": "torch.utils.flop_counter", "peak_tflops": peak, "peak_source": source}
