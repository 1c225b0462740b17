"""Benchmark harness: `python -m benchmarks.run --data DIR --out DIR` (also under torchrun).

Measures, on the same data, batch, resolution and training step (rn50.core.step.train_step, the one training
uses):
  synthetic  the training step on a device-resident batch: the GPU ceiling
  loader     each input pipeline alone: the img/s it can deliver
  train      each input pipeline feeding the training step: end to end
and derives MFU, input stall, a bottleneck verdict per loader and the time a 90-epoch ImageNet run would
take. Writes report.json (schema in docs/benchmark-report.md), report.md and PNG plots into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# What reading the flags needs, and nothing heavier: `python -m benchmarks.run` reads them before the imports
# below parse_args load torch and DALI (seconds), so a mistyped flag is reported at once
from benchmarks import levers as levers_mod
from pipelines.registry import KINDS, REGISTRY, concrete_kind, kinds
from pipelines.storage import display
from rn50.config.errors import UserError, check_flags_first
from rn50.config.profile_flags import TRACE_DIR, add_profiling_flags
from rn50.config.machine import Machine
from rn50.config.recipe import Recipe, resolve
from rn50.config.cli import add_recipe_flags, parse_strict

MODES = ("synthetic", "loader", "train")
READ_MODE = "read"  # raw reads from the source, no decoding (benchmarks/read.py); asked for by name, not a default
LOADERS = kinds(reads_images=True)  # synthetic data is the 'synthetic' mode
IMAGENET_TRAIN, IMAGENET_VAL, RECIPE_EPOCHS = 1_281_167, 50_000, 90
WIDTH = max(map(len, KINDS))  # console rows: every loader's name in one column (torchvision-gpu is the longest)


def count(n: int, noun: str, plural: str | None = None) -> str:
    """"1 step", "3 steps": console and report lines."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def default_loaders(gpu: bool) -> tuple[str, ...]:
    """Every loader this machine can run: all of them with CUDA, those that run on the CPU without it."""
    return LOADERS if gpu else kinds(reads_images=True, needs_cuda=False)


@dataclasses.dataclass
class Plan:
    modes: tuple[str, ...]
    loaders: tuple[str, ...]
    warmup_steps: int
    steps: int
    repeats: int
    levers: tuple = ()  # benchmarks.levers.Lever, measured after the main table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Every input is checked before the first measurement: a mistake "
                                            "costs seconds, not a benchmark.")
    parser.add_argument("--data", required=True, type=Path, help="folder with train/<class>/*.JPEG")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.json, report.md, plots")
    parser.add_argument("--modes", default=",".join(MODES), help="subset of synthetic,loader,train (default all)")
    parser.add_argument("--loaders", default=None,
                        help=f"subset of {','.join(LOADERS)}, or auto (dali on a GPU machine, dali-cpu without) "
                             f"(default: every one this machine can run: all on a "
                             f"GPU machine, {','.join(default_loaders(False))} without one)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="excluded from timing (default 20 on a GPU, 3 on the CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per window (default 100 on a GPU, 6 on the CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed windows per measurement, mean +- std (default 3 on a GPU, 2 on the CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's peak dense fp16/bf16 TFLOP/s, overriding the built-in table "
                             "(default: the table's figure for the GPU found; none: no MFU)")
    parser.add_argument("--autotune", action="store_true",
                        help="sweep DALI threads, hw_decoder_load and prefetch in loader mode; save the best "
                             "(default off)")
    parser.add_argument("--levers", default=None, metavar="LEVER[,LEVER...]",
                        help="measure the baseline, each speed lever and the best combination (saved as "
                             f"OUT/levers.toml): {levers_mod.NAMES_HELP} (default none; docs/benchmarks.md#speed-levers)")
    parser.add_argument("--compare-data", type=Path, default=None, metavar="DATA",
                        help="read mode: the same data in the other form (shards beside folders, or S3 beside "
                             "local), read and compared")
    parser.add_argument("--training-runs", type=Path, nargs="*", default=[], metavar="RUN_DIR",
                        help="finished rn50.train run folders whose time-to-accuracy (--target-top1) the report "
                             "lists (default none)")
    add_profiling_flags(parser, "counted in each measurement from its first warm-up step; each measurement "
                                "writes its own trace")
    add_recipe_flags(parser)
    return parse_strict(parser, argv)


if __name__ == "__main__":
    check_flags_first(parse_args)

import torch  # noqa: E402

from benchmarks import autotune as autotuning  # noqa: E402
from benchmarks import read as read_mod  # noqa: E402
from benchmarks.flops import flops_per_image, mfu, peak_tflops  # noqa: E402
from benchmarks.recommend import ratios_to_dali, recommend  # noqa: E402
from benchmarks.report import write_reports  # noqa: E402
from benchmarks.stall import StepTimer, Window  # noqa: E402
from rn50.system.telemetry import Telemetry  # noqa: E402
from rn50.observe import tracking  # noqa: E402
from benchmarks.verdict import verdict  # noqa: E402
from rn50.core.step import check_cuda_only_settings  # noqa: E402
from rn50.system.dist import DistEnv, all_gather_objects, barrier, init_distributed, shutdown  # noqa: E402
from rn50.core.loaders import build_split  # noqa: E402
from rn50.observe.profiling import StepProfiler, check_flags, check_window, named_range  # noqa: E402
from rn50.system.provenance import environment  # noqa: E402
from rn50.core.schedule import set_lr  # noqa: E402
from rn50.core.step import build_training, train_step  # noqa: E402


def machine_defaults(args, gpu: bool) -> None:
    """Fill the harness's own options the user left open with defaults for the device it runs on."""
    if args.loaders is None:  # `--loaders ""` means none: a synthetic-only run
        args.loaders = ",".join(default_loaders(gpu))
    # `auto`, as rn50.train's --loader auto: dali on a GPU machine, dali-cpu without one
    args.loaders = ",".join(concrete_kind(name, "cuda" if gpu else "cpu") for name in args.loaders.split(","))
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (20 if gpu else 3)
    args.steps = args.steps if args.steps is not None else (100 if gpu else 6)
    args.repeats = args.repeats if args.repeats is not None else (3 if gpu else 2)


def recipe_defaults(gpu: bool) -> dict:
    """Recipe and machine defaults for the device, by flat name: they go in below every preset and flag
    (rn50.config.recipe.resolve's `defaults`), so `--preset rtx3090x4` on a CPU machine keeps its batch of 192."""
    if gpu:
        return {}
    # CPU defaults: the recipe's are sized for GPU machines; 256 images would be minutes per step. The same
    # cores for every CPU loader (DALI threads, worker processes, reading threads): a fair comparison
    cores = os.cpu_count() or 1
    return {"batch_size": 32, "dali_threads": cores, "workers": cores}


def make_plan(args) -> Plan:
    modes = tuple(m for m in args.modes.split(",") if m)
    loaders = tuple(name for name in args.loaders.split(",") if name)
    if not modes:
        raise UserError("no modes to measure; pass --modes with some of synthetic,loader,train")
    if args.loader is not None:
        raise UserError("the harness measures the loaders named by --loaders (e.g. --loaders dali,torchvision), "
                        "not --loader")
    for mode in modes:
        if mode not in MODES and mode != READ_MODE:
            raise UserError(f"unknown mode {mode!r}; choose from {', '.join(MODES + (READ_MODE,))}")
    for name in loaders:
        if name not in LOADERS:
            raise UserError(f"unknown loader {name!r}; choose from {', '.join(LOADERS)} "
                            "(synthetic data is the 'synthetic' mode)")
    if args.steps < 2 or args.warmup_steps < 1 or args.repeats < 1:
        raise UserError("a timed window needs --steps >= 2 after --warmup-steps >= 1, and --repeats >= 1")
    if getattr(args, "compare_data", None) is not None and READ_MODE not in modes:
        raise UserError("--compare-data is compared in the read mode: add read to --modes (e.g. --modes "
                        "synthetic,loader,train,read)")
    levers = levers_mod.parse_levers(args.levers) if args.levers is not None else ()
    if levers and not {"synthetic", "train"} & set(modes):
        raise UserError("--levers measures training steps: include synthetic or train in --modes")
    return Plan(modes, loaders, args.warmup_steps, args.steps, args.repeats, tuple(levers))


def endless(loader):
    """Batches across epoch boundaries, so a window may be longer than one epoch of a small dataset."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        delivered = 0
        for batch in loader:
            delivered += 1
            yield batch
        if not delivered:  # build_loader refuses a share smaller than a batch; never spin on an empty loader
            raise UserError(f"the loader delivered no batch in epoch {epoch}; lower --batch-size")
        epoch += 1


class Bench:
    def __init__(self, recipe: Recipe, data: Path, env: DistEnv, plan: Plan, machine: Machine | None = None):
        self.recipe, self.data, self.env, self.plan = recipe, data, env, plan
        self.machine = machine or Machine()
        self.batch_size = recipe.optimisation.batch_size
        self.telemetry = Telemetry(env.device.index if env.device.type == "cuda" else None)
        # --profile-steps: (window, tool, report folder), set by run(); measure() profiles each measurement's
        # steps into its own trace (lever variants and the autotune sweep are not profiled)
        self.profile: tuple | None = None
        self.profiler = StepProfiler(None, Path(), env.rank, env.device)  # off outside measure()
        self.traces: list[dict] = []

    def with_settings(self, recipe: Recipe, machine: Machine) -> "Bench":
        """The same data, device and plan with another recipe or machine settings (a speed lever)."""
        return Bench(recipe, self.data, self.env, self.plan, machine)

    def loader(self, kind: str, **overrides):
        return build_split(self.recipe, self.machine, kind, "train", self.data, self.env, **overrides)

    def windows(self, loader, work) -> tuple[list[Window], list[dict]]:
        """Warm-up, then `repeats` timed windows; `work(images, labels)` is the step (None: loader only)."""
        timer = StepTimer(self.env.device)
        batches, steps = endless(loader), self.plan.steps
        counted = itertools.count(1)  # the measurement's steps, warm-up included: --profile-steps counts them

        def step():
            n = next(counted)
            self.profiler.begin(n)
            with named_range("input wait"):
                images, labels = next(batches)  # the input wait happens here, between the marks
            timer.before()
            if work is not None:
                work(images, labels)
            timer.after()
            self.profiler.end(n)

        self.compile_s = None
        for n in range(self.plan.warmup_steps):
            if n == 0 and work is not None and self.machine.compile:  # the step that compiles, timed alone
                self._sync()
                started = time.perf_counter()
                step()
                self._sync()
                self.compile_s = time.perf_counter() - started  # a result row's compile_s (measure)
            else:
                step()
        windows, telemetry = [], []
        for _ in range(self.plan.repeats):
            self.telemetry.start()
            step()  # untimed: the previous window's synchronisation and the telemetry start end here
            first = len(timer.host_after)
            for _ in range(steps):
                step()
            windows.append(timer.window(first, self.batch_size))
            telemetry.append(self.telemetry.stop(images=steps * self.batch_size))
        return windows, telemetry

    def _sync(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)

    def train_windows(self, loader, env: DistEnv | None = None):
        env = env or self.env
        # synthetic labels are uniform: equal counts stand in (a weighted loss costs the same either way)
        counts = getattr(loader, "class_counts", None) or (1,) * loader.num_classes
        parts = build_training(self.recipe, loader.num_classes, env, self.machine, profiling=self.profile is not None,
                               class_counts=counts)
        # the LR a step of the recipe has after warm-up: updates as large as training's (and an LR-scaled
        # larger batch, when a lever asks for one)
        set_lr(parts.optimizer, self.recipe.optimisation.peak_lr(env.world_size))
        return self.windows(loader, lambda images, labels: train_step(parts, images, labels))

    def measure(self, mode: str, loader_name: str) -> dict:
        """One row: `mode` through `loader_name` ("synthetic" in synthetic mode). The row's model, graph pool and
        pipeline are gone when it returns, so the next row's memory_peak_gib is its own."""
        try:
            return self._measure(mode, loader_name)
        finally:
            release_memory(self.env.device)

    def _measure(self, mode: str, loader_name: str) -> dict:
        loader = self.loader(loader_name)
        cuda = self.env.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.env.device)
        if self.profile:
            window, tool, out = self.profile
            name = mode if mode == loader_name else f"{mode}-{loader_name}"
            self.profiler = StepProfiler(window, out / TRACE_DIR / name, self.env.rank, self.env.device, tool,
                                         print if self.env.is_main else (lambda *a, **k: None))
        try:
            if mode == "loader":
                windows, telemetry = self.windows(loader, None)
            else:
                windows, telemetry = self.train_windows(loader)
        finally:
            if self.profile and self.profiler.close():  # each rank wrote its own rank<R> file beside rank 0's
                self.traces += [{"mode": mode, "loader": loader_name, "rank": rank,
                                 "path": f"{TRACE_DIR}/{name}/rank{rank}.pt.trace.json"}  # relative to --out
                                for rank in range(self.env.world_size)]
            self.profiler = StepProfiler(None, Path(), self.env.rank, self.env.device)
        memory = torch.cuda.max_memory_allocated(self.env.device) / 2**30 if cuda else None
        return {**summarise(mode, loader_name, windows, telemetry, self.plan, self.env), "decode": loader.decode,
                "memory_peak_gib": memory,
                # --compile: the first warm-up step's seconds (it compiles); warm-up is never in the timed windows
                **({"compile_s": self.compile_s} if self.machine.compile and mode != "loader" else {})}

    def single_gpu_ceiling(self) -> float | None:
        """Synthetic img/s of rank 0 alone (no DDP), for the scaling efficiency of a multi-GPU run."""
        result = None
        if self.env.is_main:
            alone = DistEnv(0, 1, self.env.local_rank, self.env.device)
            loader = build_split(self.recipe, self.machine, "synthetic", "train", self.data, alone)
            windows, _ = self.train_windows(loader, alone)
            result = statistics.fmean(w.img_per_s for w in windows)
            del loader
            release_memory(self.env.device)
        barrier()
        return result


def spread(values: list[float]) -> float | None:
    """(max - min) / mean of a measurement's windows; None with a single window (its spread is unknown)."""
    return (max(values) - min(values)) / statistics.fmean(values) if len(values) > 1 else None


def release_memory(device: torch.device) -> None:
    """Between rows: collect what is unreachable (nothing should be: the step and the loaders hold no
    cycles), hand the CUDA cache back and start the peak-memory count afresh."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def summarise(mode: str, loader_name: str, windows: list[Window], telemetry: list[dict], plan: Plan,
              env: DistEnv) -> dict:
    """Gather every rank's windows; figures per rank and in total (sum over ranks)."""
    mine = {
        "rank": env.rank,
        "img_per_s": statistics.fmean(w.img_per_s for w in windows),
        "step_time": windows[-1].step_stats(),
        "stall_fraction": statistics.fmean(w.stall_fraction for w in windows) if mode != "loader" else None,
        "windows_img_per_s": [w.img_per_s for w in windows],
        "timeline": {"step_s": windows[-1].step_s, "wait_s": windows[-1].wait_s},
        "telemetry": telemetry[-1],
    }
    ranks = all_gather_objects(mine)
    per_repeat_total = [sum(r["windows_img_per_s"][i] for r in ranks) for i in range(plan.repeats)]
    total = statistics.fmean(per_repeat_total)
    return {
        "img_per_s": total,  # all ranks together (first key: readers look for it first)
        "mode": mode,
        "loader": loader_name,
        "img_per_s_per_gpu": total / env.world_size,
        "img_per_s_std": statistics.stdev(per_repeat_total) if plan.repeats > 1 else None,
        # each timed window's img/s (all ranks) and their spread, (max - min) / mean: what a difference
        # between two measurements must beat before it means anything (verdicts, levers)
        "img_per_s_windows": per_repeat_total,
        "img_per_s_spread": spread(per_repeat_total),
        "step_time": ranks[0]["step_time"],
        "warmup_steps": plan.warmup_steps,
        "timed_steps": plan.steps,
        "repeats": plan.repeats,
        # the worst rank's stall: one waiting rank holds every other at the next all-reduce
        "stall": {"fraction": max(r["stall_fraction"] for r in ranks), "basis": windows[-1].stall_basis}
        if mode != "loader" else None,
        "telemetry": ranks[0]["telemetry"],
        "per_rank": [{k: r[k] for k in ("rank", "img_per_s", "step_time", "stall_fraction")} for r in ranks],
        "timeline": ranks[0]["timeline"],
    }


def derive(results: list[dict], plan: Plan, env: DistEnv, flops: dict, device_type: str) -> dict:
    """MFU per measurement; stall, ratio to the ceiling, verdict and 90-epoch time per loader."""
    by = {(r["mode"], r["loader"]): r for r in results}
    for r in results:
        r["mfu"] = mfu(r["img_per_s_per_gpu"], flops["per_image_train"], flops["peak_tflops"]) \
            if r["mode"] != "loader" else None
    ceiling = by.get(("synthetic", "synthetic"))
    verdicts, estimates = {}, {}
    for name in plan.loaders:
        train, alone = by.get(("train", name)), by.get(("loader", name))
        stall = train["stall"]["fraction"] if train else None
        ratio = train["img_per_s"] / ceiling["img_per_s"] if train and ceiling else None
        headroom = alone["img_per_s"] / ceiling["img_per_s"] if alone and ceiling else None
        verdicts[name] = {**verdict(name, device_type, stall, ratio, headroom, ratio_spread=noise(train, ceiling),
                                    headroom_spread=noise(alone, ceiling)), "stall_fraction": stall,
                          "stall_basis": train["stall"]["basis"] if train else None,
                          "ratio_to_synthetic": ratio, "stall_cross_check": 1 - ratio if ratio is not None else None,
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
    return {"verdicts": verdicts, "time_to_train_90_epochs": estimates, "ratios": ratios, "ratios_to_dali": to_dali,
            "recommendation": recommend(results, verdicts, to_dali, device_type, env.world_size)}


def noise(a: dict | None, b: dict | None) -> float | None:
    """How far a ratio of two measurements can move by run-to-run noise: their windows' spreads added;
    None when either was not measured or had a single window."""
    if not a or not b or a.get("img_per_s_spread") is None or b.get("img_per_s_spread") is None:
        return None
    return a["img_per_s_spread"] + b["img_per_s_spread"]


def time_to_train(img_per_s: float) -> dict:
    """A 90-epoch ImageNet run at this throughput (so at the benchmark's resolution and batch). Validation
    is assumed 3x faster than training (forward only: 8.18 of 24.3 GFLOPs), so its hours are an estimate."""
    train_h = RECIPE_EPOCHS * IMAGENET_TRAIN / img_per_s / 3600
    val_h = RECIPE_EPOCHS * IMAGENET_VAL / (3 * img_per_s) / 3600
    return {"train_hours": train_h, "validation_hours_estimated": val_h, "total_hours": train_h + val_h,
            "epochs": RECIPE_EPOCHS, "train_images": IMAGENET_TRAIN, "val_images": IMAGENET_VAL}


def measure_resolutions(bench: "Bench", plan: Plan, results: list[dict], say) -> list[dict]:
    """Synthetic and end-to-end img/s at every training resolution the recipe's schedule uses (progressive
    resizing); the main table's were taken at the first epoch's resolution."""
    aug = bench.recipe.augmentation
    first = aug.train_size(0)
    kinds = [k for k in [("synthetic", "synthetic")] if "synthetic" in plan.modes]
    kinds += [("train", name) for name in plan.loaders if "train" in plan.modes]
    rows = [{"image_size": first, "mode": r["mode"], "loader": r["loader"], "img_per_s": r["img_per_s"]}
            for r in results if (r["mode"], r["loader"]) in kinds]
    for size in sorted(set(aug.train_sizes(bench.recipe.schedule.epochs)) - {first}):
        fixed = replace(bench.recipe, augmentation=replace(aug, image_size=size, min_res=0, max_res=0))
        at_size = bench.with_settings(fixed, bench.machine)
        for mode, loader in kinds:
            img_per_s = at_size.measure("train", loader)["img_per_s"]
            rows.append({"image_size": size, "mode": mode, "loader": loader, "img_per_s": img_per_s})
            say(f"  {mode:9s} {loader:{WIDTH}s} {img_per_s:10.1f} img/s at {size} px", flush=True)
    return rows


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


def prepare_out(out: Path) -> None:
    """The report folder exists and takes files, before anything is measured."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise UserError(f"cannot write the report into {out} ({exc.strerror}); pass a writable folder as --out") from None


def time_to_accuracy(run_dirs: list[Path]) -> list[dict]:
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


def run(args, argv) -> dict:
    env = init_distributed(args.device or "auto")
    machine_defaults(args, env.device.type == "cuda")
    plan = make_plan(args)
    # the harness's CPU sizes go in as the lowest layer, below every preset and flag
    config = resolve(args, defaults=recipe_defaults(env.device.type == "cuda"))
    recipe, machine = config.recipe, config.machine
    arch, size, batch = recipe.model.arch, recipe.augmentation.image_size, recipe.optimisation.batch_size
    check_cuda_only_settings(recipe, machine, env.device)
    check_flags(args.profile_steps, args.profiler, env.device)
    tracking.check_available(machine.tracker)  # a missing extra is a start-up error, not a lost benchmark
    measurement_steps = plan.warmup_steps + plan.repeats * (1 + plan.steps)
    check_window(args.profile_steps, measurement_steps, f"each measurement ({count(plan.warmup_steps, 'warm-up step')} + "
                 f"{plan.repeats} x (1 untimed + {plan.steps} timed))")
    needs_cuda = [name for name in plan.loaders if REGISTRY[name].needs_cuda]
    if env.device.type != "cuda" and needs_cuda:
        raise UserError(f"{' and '.join(needs_cuda)} need{'s' if len(needs_cuda) == 1 else ''} a CUDA GPU; "
                        f"benchmark --loaders {','.join(default_loaders(False))} here")
    # every input is checked before the first measurement, which may take many minutes
    accuracy_rows = time_to_accuracy(args.training_runs)
    if args.compare_data is not None:
        read_mod.check_source(args.compare_data)  # listed now: a wrong path is one line, not a lost benchmark
    prepare_out(args.out)
    bench = Bench(recipe, args.data, env, plan, machine)
    if args.profile_steps:
        bench.profile = (args.profile_steps, args.profiler, args.out)
    probe = bench.loader("synthetic")  # validates the data folder and gives its size
    say = print if env.is_main else (lambda *a, **k: None)
    say(f"benchmarking {arch} at {size} px, batch {batch} x {env.world_size} "
        f"on {env.device}: modes {','.join(plan.modes)}; loaders {','.join(plan.loaders) or 'none'}; "
        f"{plan.warmup_steps} warm-up + {count(plan.steps, 'timed step')} x {count(plan.repeats, 'window')}",
        flush=True)
    results = []
    jobs = [("synthetic", "synthetic")] if "synthetic" in plan.modes else []
    jobs += [(mode, name) for name in plan.loaders for mode in ("loader", "train") if mode in plan.modes]
    for mode, name in jobs:
        result = bench.measure(mode, name)
        results.append(result)
        say(f"  {mode:9s} {name:{WIDTH}s} {result['img_per_s']:10.1f} img/s"
            + (f"  stall {result['stall']['fraction']:.1%} ({result['stall']['basis']})" if result["stall"] else ""),
            flush=True)
    flops = flops_block(recipe, probe.num_classes, args.peak_tflops)
    report = {
        "schema": "rn50-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {**environment(), "world_size": env.world_size, "device_type": env.device.type,
                        "command": " ".join(["python -m benchmarks.run", *argv]),
                        "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "python"},
        "config": {"arch": arch, "batch_size": batch, "image_size": size,
                   "global_batch": batch * env.world_size, "modes": list(plan.modes),
                   "loaders": list(plan.loaders), "warmup_steps": plan.warmup_steps, "timed_steps": plan.steps,
                   "repeats": plan.repeats, "dataset": {"path": display(args.data),
                                                        "train_images": probe.num_samples,
                                                        "classes": probe.num_classes},
                   # the machine's own `loader` setting is not used here: --loaders names the loaders
                   "recipe": recipe.to_dict(), "machine": {k: v for k, v in machine.to_dict().items() if k != "loader"}},
        "flops": flops,
        "results": results,
        **derive(results, plan, env, flops, env.device.type),
        "scaling": None,
        "autotune": None,
        "levers": None,
        "time_to_train_schedule": None,
        "time_to_accuracy": accuracy_rows,
        # the --profile-steps window; B <= warm-up keeps the profiler's cost (and the trace's export) out of
        # the timed windows
        "profile": {"steps": f"{args.profile_steps[0]}:{args.profile_steps[1]}", "tool": args.profiler,
                    "in_warm_up": args.profile_steps[1] <= plan.warmup_steps, "traces": bench.traces}
        if args.profile_steps else None,
    }
    if env.distributed and "synthetic" in plan.modes:
        single = bench.single_gpu_ceiling()
        if env.is_main and single:
            aggregate = next(r for r in results if r["mode"] == "synthetic")["img_per_s"]
            report["scaling"] = {"single_gpu_img_per_s": single, "aggregate_img_per_s": aggregate,
                                 "world_size": env.world_size, "efficiency": aggregate / (env.world_size * single)}
    if recipe.augmentation.max_res and {"synthetic", "train"} & set(plan.modes):
        rows = measure_resolutions(bench, plan, results, say)
        report["time_to_train_schedule"] = time_to_train_schedule(recipe, rows)
    if args.autotune:
        report["autotune"] = autotuning.sweep(bench, plan, args.out if env.is_main else None)
    if plan.levers:
        def mfu_of(lever_recipe):
            per_image = flops_per_image(lever_recipe.model.arch, lever_recipe.augmentation.image_size,
                                        probe.num_classes, blurpool=lever_recipe.model.blurpool)
            return lambda img_per_s_per_gpu: mfu(img_per_s_per_gpu, per_image, flops["peak_tflops"])

        report["levers"] = levers_mod.measure_levers(bench, list(plan.levers), plan.modes,
                                                     plan.loaders[0] if plan.loaders else None, mfu_of, results)
        if env.is_main and report["levers"]["best_fields"]:
            # training's own start-up checks, once more on exactly what is written: a preset it would refuse
            # is never saved
            levers_mod.check_preset(report["levers"]["best_fields"], recipe, machine, env.device)
            report["levers"]["preset"] = str(args.out / "levers.toml")
            levers_mod.write_preset(report["levers"]["best_fields"], args.out / "levers.toml")
    if READ_MODE in plan.modes:  # after the loader and train rows, which its verdict weighs
        report["read"] = read_mod.section(args.data, args.compare_data, results, env, recipe.seed,
                                          max(8, machine.workers), say)
    if env.is_main:
        write_reports(report, args.out)
        for pair, modes in report["ratios"].items():
            for mode, value in modes.items():
                print(f"{pair} {mode}-mode ratio: {value:.2f}x", flush=True)
        for name, v in report["verdicts"].items():
            print(f"verdict for {name}: {v['verdict']} ({'; '.join(v['evidence'])})", flush=True)
        print(f"wrote {args.out / 'report.json'}, report.md and plots", flush=True)
        tracking.log_bench(machine, args.out, report)  # --tracker: the report's figures, the report and plots
    return report


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(parse_args(argv), argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
