"""tools.sweep's grid: the base LR x per-GPU batch points in run order, and what would fail every run at
start-up, checked once before the first (the flags after `--` with rn50.train's parser, the dataset with
the one listing, each grid point's recipe resolved as rn50.train resolves it, weight files, the device)."""

from __future__ import annotations

import argparse
import contextlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

from rn50.config.errors import UserError
from rn50.config.recipe import Optimisation

BASE_BATCH = Optimisation().base_batch  # the recipe's default; only quoted in help, each run resolves its own
# rn50.train flags the sweep sets itself: given again after `--` they would silently fight the grid
MANAGED_FLAGS = {"--data": "--data", "--out": "--out", "--base-lr": "--lrs", "--batch-size": "--batch-sizes",
                 "--resume": "(the sweep resumes unfinished runs itself)"}


@dataclass(frozen=True)
class GridPoint:
    base_lr: float
    batch_size: int  # per GPU (per process), as rn50.train's --batch-size

    @property
    def name(self) -> str:
        # `:g` keeps folder names short and stable: 0.1 and 0.10 are the same run
        return f"lr{self.base_lr:g}_bs{self.batch_size}"

    @property
    def label(self) -> str:
        return f"lr={self.base_lr:g} bs={self.batch_size}"



def parse_values(text: str, flag: str, kind: type) -> list:
    """Comma-separated numbers of `kind` (float or int), all positive; duplicates dropped, order kept."""
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            value = float(item) if kind is float else int(item)
        except ValueError:
            what = "a number" if kind is float else "a whole number"
            raise UserError(f"{flag}: {item!r} is not {what}; give comma-separated values such as "
                            f"{'0.05,0.1,0.2' if kind is float else '32,64'}") from None
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag}: {item!r} must be a positive number")
        if value not in values:
            values.append(value)
    if not values:
        raise UserError(f"{flag} is empty; give comma-separated values such as "
                        f"{'0.05,0.1,0.2' if kind is float else '32,64'}")
    return values


def parse_grid(lrs: str, batch_sizes: str) -> list[GridPoint]:
    """The grid in run order: batch sizes outer, LRs inner, so each batch size's LRs sit together."""
    lr_values = parse_values(lrs, "--lrs", float)
    bs_values = parse_values(batch_sizes, "--batch-sizes", int)
    return [GridPoint(lr, bs) for bs in bs_values for lr in lr_values]


def check_data(data: Path, manifest: Path | None) -> None:
    """The dataset every run lists first, checked once with rn50.train's own listing (pipelines.list_data, its
    messages): class folders (train/ with class folders that hold images, val/ with classes that training has;
    with --manifest, its train.txt and val.txt) or a tools.shard folder. No image is opened (the header check
    stays with each run)."""
    from pipelines import list_data
    from pipelines.folder import SPLITS

    for split in SPLITS:
        list_data(data, split, manifest)


def parse_run_flags(extra: list[str], data: Path, out: Path) -> argparse.Namespace:
    """rn50.train's own parser on the flags after `--`, with the sweep's managed flags refused first."""
    for token in extra:
        flag = token.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            raise UserError(f"{flag} after -- is set by the sweep ({MANAGED_FLAGS[flag]}); remove it")
    from rn50.train import parse_args  # imports torch: only once the cheap checks have passed

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # an argparse error prints usage and exits; keep its reason
            return parse_args(["--data", str(data), "--out", str(out), *extra])
    except UserError as err:  # an unknown flag, or (newer parsers) a value of the wrong type
        raise UserError(f"bad rn50.train flag after --: {err}") from None
    except SystemExit as stop:
        if stop.code in (0, None):  # `-- --help`: rn50.train's help is printed; nothing more to do
            raise
        reason = captured.getvalue().strip().splitlines()[-1:] or ["invalid flags"]
        raise UserError(f"bad rn50.train flag after --: {reason[0].split('error: ', 1)[-1]}") from None


def check_runs(grid: list[GridPoint], extra: list[str], data: Path, out: Path) -> None:
    """Everything that would make every run of the grid fail at start-up, checked once before the first:
    the flags after `--`, the dataset layout, each grid point's recipe, the architectures, weight files (and
    --weights' file, downloaded here once where it can be) and the device the loader needs. A typo would
    otherwise fail every run, one start-up at a time."""
    args = parse_run_flags(extra, data, out / grid[0].name)
    check_data(data, args.manifest)
    from pipelines import check_device
    from rn50.system.device import choose_device
    from rn50.config.recipe import resolve

    resolved = resolve(args)  # a preset name or a field value that rn50.train would refuse, for every point
    for point in grid:  # the grid's values applied as each run applies them (--base-lr, --batch-size)
        try:
            resolve(argparse.Namespace(**{**vars(args), "base_lr": point.base_lr, "batch_size": point.batch_size}))
        except UserError as err:
            raise UserError(f"grid point {point.label}: {err}") from None
    recipe, machine = resolved.recipe, resolved.machine
    for flag, path in (("--finetune-from", recipe.model.finetune_from), ("--kd-teacher", recipe.distillation.teacher)):
        if path and not Path(path).is_file():
            raise UserError(f"{flag} {path} does not exist; pass a checkpoint_*.pt of ours or a torchvision "
                            "state dict (.pth)")
    if recipe.model.weights:  # a name the arch lacks, or a file neither cached nor downloadable: fetched once here
        from rn50.core import pretrained

        weights = pretrained.named(recipe.model.arch, recipe.model.weights)
        pretrained.ensure_file(weights, fetch=True, wait=lambda: None, progress=True)
    # GPUs that CUDA cannot use, --device cuda without one, or the GPU loader without CUDA
    device = choose_device(machine.device)
    check_device(machine.for_device(device.type).loader, device)  # --loader auto: dali with CUDA, dali-cpu without


def with_tracker_group(extra: list[str], data: Path, out: Path) -> list[str]:
    """The flags after `--`, plus `--tracker-group <sweep folder name>` when the runs log to a tracker and no
    group was named: a sweep's runs are found together in W&B and MLflow."""
    from rn50.config.recipe import resolve

    machine = resolve(parse_run_flags(extra, data, out)).machine
    if machine.tracker == "none" or machine.tracker_group:
        return extra
    return [*extra, "--tracker-group", out.resolve().name]
