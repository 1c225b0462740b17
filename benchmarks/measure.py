"""The harness's measurements: `Bench` times the training step (rn50.core.step.train_step, the one training
uses) or a loader alone over warm-up and timed windows, gathers every rank's figures into one result row;
`measure_rounds` measures the main table in rounds (every row once per round, in an order that reverses each
round) and merges each row's rounds; `measure_resolutions` the recipe's other training resolutions
(progressive resizing)."""

from __future__ import annotations

import gc
import itertools
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.noise import round_order, spread
from benchmarks.plan import WIDTH, Plan
from benchmarks.stall import StepTimer, Window
from benchmarks.threads import ThreadBudget, check_model_threads
from pipelines.loader import endless
from rn50.config.machine import Machine
from rn50.config.profile_flags import TRACE_DIR
from rn50.config.recipe import Recipe
from rn50.core.loaders import build_split
from rn50.core.schedule import set_lr
from rn50.core.step import build_training, train_step
from rn50.observe.profiling import StepProfiler, named_range
from rn50.system.dist import DistEnv, all_gather_objects, barrier
from rn50.system.load import LoadMonitor, merge as merge_load
from rn50.system.telemetry import Telemetry


class Bench:
    def __init__(self, recipe: Recipe, data: Path, env: DistEnv, plan: Plan, machine: Machine | None = None,
                 threads: ThreadBudget | None = None):
        self.recipe, self.data, self.env, self.plan = recipe, data, env, plan
        self.machine = machine or Machine()
        self.threads = threads  # the thread budget run.py applied: every row checks that it still holds
        self.batch_size = recipe.optimisation.batch_size
        gpu = env.device.index if env.device.type == "cuda" else None
        self.telemetry = Telemetry(gpu)
        # what else ran during each window (other processes' CPU time, steal, other GPU processes, throttling)
        self.load = LoadMonitor(gpu)
        self.load_windows: list[dict] = []  # the last windows() call's, one per window, as compile_s is kept
        # --profile-steps: (window, tool, report folder), set by benchmarks.run.run; measure() profiles each
        # measurement's steps into its own trace (lever variants and the autotune sweep are not profiled)
        self.profile: tuple | None = None
        self.profiler = StepProfiler(None, Path(), env.rank, env.device)  # off outside measure()
        self.traces: list[dict] = []

    def with_settings(self, recipe: Recipe, machine: Machine) -> "Bench":
        """The same data, device and plan with another recipe or machine settings (a speed lever)."""
        return Bench(recipe, self.data, self.env, self.plan, machine, self.threads)

    def loader(self, kind: str, **overrides):
        return build_split(self.recipe, self.machine, kind, "train", self.data, self.env, **overrides)

    def windows(self, loader, work, repeats: int | None = None) -> tuple[list[Window], list[dict]]:
        """Warm-up, then `repeats` timed windows (the plan's by default); `work(images, labels)` is the step
        (None: loader only)."""
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
        windows, telemetry, self.load_windows = [], [], []
        for _ in range(self.plan.repeats if repeats is None else repeats):
            self.load.start()  # first: its /proc scan falls before the untimed step, outside the timed steps
            self.telemetry.start()
            step()  # untimed: the previous window's synchronisation and the telemetry start end here
            first = len(timer.host_after)
            for _ in range(steps):
                step()
            windows.append(timer.window(first, self.batch_size))
            telemetry.append(self.telemetry.stop(images=steps * self.batch_size))
            self.load_windows.append(self.load.stop())
        return windows, telemetry

    def _sync(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)

    def train_windows(self, loader, env: DistEnv | None = None, repeats: int | None = None):
        env = env or self.env
        # synthetic labels are uniform: equal counts stand in (a weighted loss costs the same either way)
        counts = getattr(loader, "class_counts", None) or (1,) * loader.num_classes
        parts = build_training(self.recipe, loader.num_classes, env, self.machine, profiling=self.profile is not None,
                               class_counts=counts)
        # the LR a step of the recipe has after warm-up: updates as large as training's (and an LR-scaled
        # larger batch, when a lever asks for one)
        set_lr(parts.optimizer, self.recipe.optimisation.peak_lr(env.world_size))
        # --accum-steps K: each batch is the next micro-batch of an optimizer step (a step every K batches), so
        # the windows time accumulation as training runs it; img/s counts every micro-batch's images
        micros = itertools.count()
        return self.windows(loader, lambda images, labels: train_step(parts, images, labels,
                                                                      next(micros) % parts.accum_steps), repeats)

    def measure(self, mode: str, loader_name: str, repeats: int | None = None) -> dict:
        """One row: `mode` through `loader_name` ("synthetic" in synthetic mode), over `repeats` timed windows
        (the plan's by default; one per round in measure_rounds). The row's model, graph pool and pipeline are
        gone when it returns, so the next row's memory_peak_gib is its own."""
        try:
            return self._measure(mode, loader_name, self.plan.repeats if repeats is None else repeats)
        finally:
            release_memory(self.env.device)

    def _measure(self, mode: str, loader_name: str, repeats: int) -> dict:
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
                windows, telemetry = self.windows(loader, None, repeats)
            else:
                windows, telemetry = self.train_windows(loader, repeats=repeats)
        finally:
            if self.profile and self.profiler.close():  # each rank wrote its own rank<R> file beside rank 0's
                self.traces += [{"mode": mode, "loader": loader_name, "rank": rank,
                                 "path": f"{TRACE_DIR}/{name}/rank{rank}.pt.trace.json"}  # relative to --out
                                for rank in range(self.env.world_size)]
            self.profiler = StepProfiler(None, Path(), self.env.rank, self.env.device)
        if self.threads is not None:  # nothing a loader did may change how the next row's step runs
            check_model_threads(self.threads, f"after the {mode} row of {loader_name}")
        memory = torch.cuda.max_memory_allocated(self.env.device) / 2**30 if cuda else None
        # NVML's whole-device figure beside torch's allocator peak: DALI's buffers reach torch without a copy
        # (DALI's pools, not torch's allocator), so only this one counts them (docs/benchmark-report.md)
        device_peaks = [t["memory_used_peak_gib"] for t in telemetry if t.get("memory_used_peak_gib") is not None]
        return {**summarise(mode, loader_name, windows, telemetry, self.load_windows, self.plan, self.env),
                "decode": loader.decode,
                "memory_peak_gib": memory, "memory_device_peak_gib": max(device_peaks, default=None),
                "model_threads": torch.get_num_threads(),
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


def release_memory(device: torch.device) -> None:
    """Between rows: collect what is unreachable (nothing should be: the step and the loaders hold no
    cycles), hand DALI's free pool blocks and the CUDA cache back and start the peak-memory count afresh."""
    gc.collect()
    # after the collection: only blocks no pipeline holds are freed. On every device, not only CUDA: DALI
    # walks only the pools it made, so on a CPU-only machine it frees nothing and starts no CUDA. Imported
    # here, as pipelines.registry imports the loaders: importing the harness does not load DALI
    from pipelines.dali import release_unused_memory

    release_unused_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def summarise(mode: str, loader_name: str, windows: list[Window], telemetry: list[dict], load: list[dict], plan: Plan,
              env: DistEnv) -> dict:
    """Gather every rank's windows; figures per rank and in total (sum over ranks); the load beside the job, the
    worst of every rank's windows (rn50.system.load.merge)."""
    mine = {
        "rank": env.rank,
        "img_per_s": statistics.fmean(w.img_per_s for w in windows),
        "step_time": windows[-1].step_stats(),
        "stall_fraction": statistics.fmean(w.stall_fraction for w in windows) if mode != "loader" else None,
        "windows_img_per_s": [w.img_per_s for w in windows],
        "timeline": {"step_s": windows[-1].step_s, "wait_s": windows[-1].wait_s},
        "telemetry": telemetry[-1],
        "load": load,
    }
    ranks = all_gather_objects(mine)
    per_repeat_total = [sum(r["windows_img_per_s"][i] for r in ranks) for i in range(len(windows))]
    total = statistics.fmean(per_repeat_total)
    return {
        "img_per_s": total,  # all ranks together (first key: readers look for it first)
        "mode": mode,
        "loader": loader_name,
        "img_per_s_per_gpu": total / env.world_size,
        "img_per_s_std": statistics.stdev(per_repeat_total) if len(per_repeat_total) > 1 else None,
        # each timed window's img/s (all ranks) and their spread, (max - min) / mean: what a difference
        # between two measurements must beat before it means anything (verdicts, levers)
        "img_per_s_windows": per_repeat_total,
        "img_per_s_spread": spread(per_repeat_total),
        "step_time": ranks[0]["step_time"],
        "warmup_steps": plan.warmup_steps,
        "timed_steps": plan.steps,
        "repeats": len(windows),
        # the worst rank's stall: one waiting rank holds every other at the next all-reduce
        "stall": {"fraction": max(r["stall_fraction"] for r in ranks), "basis": windows[-1].stall_basis}
        if mode != "loader" else None,
        "telemetry": ranks[0]["telemetry"],
        "load": merge_load([window for r in ranks for window in r["load"]]),
        "per_rank": [{k: r[k] for k in ("rank", "img_per_s", "step_time", "stall_fraction")} for r in ranks],
        "timeline": ranks[0]["timeline"],
    }


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


def measure_rounds(bench: "Bench", jobs: list[tuple[str, str]], rounds: int, say) -> list[dict]:
    """The main table in rounds: each round measures every (mode, loader) of `jobs` once, one timed window each,
    after its own build and warm-up; the order runs forward in even rounds and backward in odd ones, so a steady
    drift of the machine (a neighbour's job, clocks, heat) reaches every row alike over each pair of rounds, and
    no row is always first. Each row's rounds are merged into one row whose windows are its rounds, in round
    order: window i of every row comes from round i, so ratios are taken round by round (benchmarks.noise)."""
    parts: dict[tuple[str, str], list[dict]] = {job: [] for job in jobs}
    profile = bench.profile
    for number in range(rounds):
        bench.profile = profile if number == 0 else None  # --profile-steps: one trace per row, the first round's
        for mode, name in round_order(jobs, number):
            part = bench.measure(mode, name, repeats=1)
            parts[(mode, name)].append(part)
            say(f"  round {number + 1}/{rounds} {mode:9s} {name:{WIDTH}s} {part['img_per_s']:10.1f} img/s"
                + (f"  stall {part['stall']['fraction']:.1%}" if part["stall"] else ""), flush=True)
    bench.profile = profile
    return [merge_rounds(parts[job], bench.env.world_size) for job in jobs]


def merge_rounds(parts: list[dict], world_size: int) -> dict:
    """One row from a measurement's rounds (each a row of one window): img/s the rounds' mean and its windows
    the rounds' figures; the stall the rounds' mean; peaks the highest; the step-time distribution, timeline
    and telemetry the last round's; a compile time the first round's (the later ones find a warm cache)."""
    last, totals = parts[-1], [part["img_per_s"] for part in parts]
    mean = statistics.fmean(totals)
    row = {**last, "img_per_s": mean, "img_per_s_per_gpu": mean / world_size, "img_per_s_windows": totals,
           "img_per_s_spread": spread(totals), "img_per_s_std": statistics.stdev(totals) if len(totals) > 1 else None,
           "repeats": len(parts), "rounds": len(parts)}
    if last["stall"] is not None:
        row["stall"] = {**last["stall"], "fraction": statistics.fmean(part["stall"]["fraction"] for part in parts)}
    for key in ("memory_peak_gib", "memory_device_peak_gib"):
        peaks = [part[key] for part in parts if part.get(key) is not None]
        row[key] = max(peaks, default=None)
    if "compile_s" in parts[0]:
        row["compile_s"] = parts[0]["compile_s"]
    row["load"] = merge_load([part["load"] for part in parts])  # the worst round's, busy in any
    row["per_rank"] = [{**rank, "img_per_s": statistics.fmean(part["per_rank"][i]["img_per_s"] for part in parts)}
                       for i, rank in enumerate(last["per_rank"])]
    return row
