"""The harness's configuration, resolved once at the door (benchmarks.run.configure), as rn50.train's is:
`bench_config`, a pure function of the parsed flags and the device type the process will run on, called
before the process group and the device exist. Nothing below it sees the flags, and nothing writes into them.

No torch here: `python -m benchmarks.run` reads its flags with the names below before it imports torch and
DALI (seconds), so a mistyped flag is one line at once.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from benchmarks import levers as levers_mod
from benchmarks.threads import ThreadBudget, this_machine
from pipelines.registry import KINDS, REGISTRY, concrete_kind, kinds
from rn50.config.errors import UserError
from rn50.config.machine import Machine
from rn50.config.recipe import Recipe, resolve

MODES = ("synthetic", "loader", "train")
READ_MODE = "read"  # raw reads from the source, no decoding (benchmarks/read.py); asked for by name, not a default
LOADERS = kinds(reads_images=True)  # synthetic data is the 'synthetic' mode
WIDTH = max(map(len, KINDS))  # console rows: every loader's name in one column (torchvision-gpu is the longest)


CPU_LOADERS = kinds(reads_images=True, needs_cuda=False)  # those that run without CUDA


def left_out_by_default(gpu: bool) -> tuple[tuple[str, str], ...]:
    """The loaders this machine could run that the default set leaves out, each with its record's reason."""
    return () if gpu else tuple((name, REGISTRY[name].not_a_cpu_default) for name in CPU_LOADERS
                                if REGISTRY[name].not_a_cpu_default)


def default_loaders(gpu: bool) -> tuple[str, ...]:
    """The loaders measured when --loaders is left out: all of them with CUDA; without it, those that run on the
    CPU less the GPU loaders built for batches on a GPU (their registry record's `not_a_cpu_default` says why)."""
    return LOADERS if gpu else tuple(name for name in CPU_LOADERS if not REGISTRY[name].not_a_cpu_default)


@dataclass(frozen=True)
class Plan:
    """What is measured: the modes, the loaders (concrete kinds) and the windows of every measurement."""
    modes: tuple[str, ...]
    loaders: tuple[str, ...]
    warmup_steps: int
    steps: int
    repeats: int
    levers: tuple = ()  # benchmarks.levers.Lever, measured after the main table
    left_out: tuple[tuple[str, str], ...] = ()  # (loader, why): the defaults' exclusions here, which the report names


@dataclass(frozen=True)
class BenchConfig:
    """Everything the harness runs with, built by `bench_config` from the flags and the device type, and only
    there: the recipe and machine settings (rn50.config.recipe.resolve, the harness's CPU sizes below every
    preset and flag), the plan, and the run's inputs and outputs."""
    recipe: Recipe
    machine: Machine  # machine.device: the device the process group is built on (a preset's [machine] too)
    plan: Plan
    data: Path
    out: Path
    compare_data: Path | None = None  # read mode: the same data in the other form
    training_runs: tuple[Path, ...] = ()  # finished rn50.train runs whose time-to-accuracy the report lists
    peak_tflops: float | None = None  # --peak-tflops: overrides the built-in table
    autotune: bool = False
    profile_steps: tuple[int, int] | None = None  # --profile-steps A:B, counted in each measurement
    profiler: str = "torch"  # --profiler: torch or nsys
    # the model step's and the loaders' threads (benchmarks/threads.py), the same for every row: run.py applies
    # threads.model_threads before the first row (apply_model_threads) and writes threads.to_dict() into the report
    threads: ThreadBudget | None = None


def recipe_defaults(gpu: bool, budget: ThreadBudget | None = None) -> dict:
    """Recipe and machine defaults for the device, by flat name: they go in below every preset and flag
    (rn50.config.recipe.resolve's `defaults`), so `--preset rtx3090x4` on a CPU machine keeps its batch of 192.
    `budget`: the thread budget (benchmarks/threads.py; this machine's when None), whose loader threads every
    CPU loader gets (DALI threads, worker processes, reading threads): the same for all, a fair comparison,
    beside the model step's own threads rather than on top of them."""
    if gpu:
        return {}  # the loaders' own thread settings (pipelines/settings.py), within the budget's share
    # CPU defaults: the recipe's are sized for GPU machines; 256 images would be minutes per step
    budget = budget or this_machine("cpu")
    return {"batch_size": 32, "dali_threads": budget.loader_threads, "workers": budget.loader_threads}


def make_plan(flags: argparse.Namespace, device_type: str) -> Plan:
    """The plan from the flags, with the options left open given this device type's defaults (`--loaders ""`
    means none: a synthetic-only run; `auto`, as rn50.train's --loader auto: dali on CUDA, dali-cpu without)."""
    gpu = device_type == "cuda"
    named = flags.loaders if flags.loaders is not None else ",".join(default_loaders(gpu))
    modes = tuple(m for m in flags.modes.split(",") if m)
    loaders = tuple(concrete_kind(name, device_type) for name in named.split(",") if name)
    warmup_steps = flags.warmup_steps if flags.warmup_steps is not None else (20 if gpu else 3)
    steps = flags.steps if flags.steps is not None else (100 if gpu else 6)
    repeats = flags.repeats if flags.repeats is not None else (3 if gpu else 2)
    if not modes:
        raise UserError("no modes to measure; pass --modes with some of synthetic,loader,train")
    if flags.loader is not None:
        raise UserError("the harness measures the loaders named by --loaders (e.g. --loaders dali,torchvision), "
                        "not --loader")
    for mode in modes:
        if mode not in MODES and mode != READ_MODE:
            raise UserError(f"unknown mode {mode!r}; choose from {', '.join(MODES + (READ_MODE,))}")
    for name in loaders:
        if name not in LOADERS:
            raise UserError(f"unknown loader {name!r}; choose from {', '.join(LOADERS)} "
                            "(synthetic data is the 'synthetic' mode)")
    if steps < 2 or warmup_steps < 1 or repeats < 1:
        raise UserError("a timed window needs --steps >= 2 after --warmup-steps >= 1, and --repeats >= 1")
    if flags.compare_data is not None and READ_MODE not in modes:
        raise UserError("--compare-data is compared in the read mode: add read to --modes (e.g. --modes "
                        "synthetic,loader,train,read)")
    levers = levers_mod.parse_levers(flags.levers) if flags.levers is not None else ()
    if levers and not {"synthetic", "train"} & set(modes):
        raise UserError("--levers measures training steps: include synthetic or train in --modes")
    left_out = left_out_by_default(gpu) if flags.loaders is None else ()
    return Plan(modes, loaders, warmup_steps, steps, repeats, tuple(levers), left_out)


def bench_config(flags: argparse.Namespace, device_type: str) -> BenchConfig:
    """The harness's configuration from the parsed flags and the device type ("cuda" or "cpu",
    torch.device.type) the process will run on: a pure function, called before the process group exists."""
    plan = make_plan(flags, device_type)
    budget = this_machine(device_type)  # the cores this process has, shared by the node's ranks
    # the harness's CPU sizes go in as the lowest layer, below every preset and flag
    config = resolve(flags, defaults=recipe_defaults(device_type == "cuda", budget))
    return BenchConfig(config.recipe, config.machine, plan, flags.data, flags.out, flags.compare_data,
                       tuple(flags.training_runs), flags.peak_tflops, flags.autotune, flags.profile_steps,
                       flags.profiler, budget)
