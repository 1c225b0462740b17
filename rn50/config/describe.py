"""What a configuration says in words: the start-up lines on the run's epochs (epoch_plan), the fields that
differ from the 90-epoch defaults, and the resolved recipe as a TOML preset (format_recipe)."""

from __future__ import annotations

from rn50.config.machine import Machine
from rn50.config.recipe import MACHINE_FIELDS, RECIPE_FIELDS, SECTIONS, Recipe, flat_items, get

def _epochs(first: int, last: int) -> str:
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


def epoch_plan(recipe: Recipe) -> list[str]:
    """Start-up lines on what the run's epochs hold, counted from 1 as the console counts them: the
    progressive-resizing plan, and a warning for each part of the recipe that lies beyond --epochs (the
    resolution ramp, the warm-up, an LR milestone). A preset scaled down with --epochs (`--preset
    ffcv_16_epochs --epochs 3`) would otherwise lose those parts without a word."""
    aug, s, lines = recipe.augmentation, recipe.schedule, []
    epochs = f"{s.epochs} epoch{'s' if s.epochs != 1 else ''}"  # "this run's 1 epoch"
    if aug.max_res:
        sizes = aug.train_sizes(s.epochs)
        runs, first = [], 1
        for epoch in range(1, s.epochs + 1):
            if epoch == s.epochs or sizes[epoch] != sizes[epoch - 1]:
                runs.append(f"{sizes[epoch - 1]} px in {_epochs(first, epoch)}")
                first = epoch + 1
        lines.append(f"progressive resizing: {', '.join(runs)} (start_ramp {aug.start_ramp} and end_ramp "
                     f"{aug.end_ramp} count epochs from 0)")
        if sizes[-1] != aug.max_res:
            low = aug.min_res or aug.image_size
            reached = "every epoch trains at" if sizes[-1] == low else "the resolution only reaches"
            lines.append(f"warning: the resolution ramp to {aug.max_res} px (start_ramp {aug.start_ramp}, end_ramp "
                         f"{aug.end_ramp}) lies beyond this run's {epochs}: {reached} {sizes[-1]} px; "
                         f"scale it down with --start-ramp and --end-ramp below {s.epochs}")
    if s.warmup_epochs >= s.epochs and s.warmup_epochs > 0:
        start = s.warmup_start_factor  # the ramp rn50.core.schedule.lr_at climbs, from start x the peak
        reached = start + (1 - start) * min(1.0, s.epochs / s.warmup_epochs)
        lines.append(f"warning: the warm-up ({s.warmup_epochs:g} epoch{'s' if s.warmup_epochs != 1 else ''}) outlasts this run's "
                     f"{epochs}: the LR "
                     f"rises to about {reached:.0%} of its peak and never decays; "
                     f"scale it down with --warmup-epochs below {s.epochs}")
    beyond = [m for m in s.lr_milestones if m >= s.epochs]
    if s.kind == "step" and beyond:
        lines.append(f"warning: LR milestone{'s' if len(beyond) > 1 else ''} at epoch{'s' if len(beyond) > 1 else ''} "
                     f"{', '.join(f'{m:g}' for m in beyond)} lie{'' if len(beyond) > 1 else 's'} beyond this run's "
                     f"{epochs}: the LR never decays there; scale them down with --lr-milestones")
    return lines


def changes_from_defaults(recipe: Recipe, machine: Machine | None = None) -> list[str]:
    """`field=value` for every field that differs from the 90-epoch recipe's defaults (and the machine's)."""
    default_recipe, default_machine = Recipe(), Machine()
    changed = [f"{flat}={_toml(value)}" for flat, value in flat_items(recipe).items()
               if value != get(default_recipe, flat)]
    if machine is not None:
        changed += [f"{flat}={_toml(getattr(machine, f.name))}" for flat, f in MACHINE_FIELDS.items()
                    if getattr(machine, f.name) != getattr(default_machine, f.name)]
    return changed


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(repr(v) for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def format_recipe(recipe: Recipe, machine: Machine | None = None) -> str:
    """The resolved recipe (and machine settings) as a TOML preset: `field = value` lines by flat name,
    one table per section, so it can be saved and loaded with --preset."""
    lines = [f"seed = {_toml(recipe.seed)}"]
    tables = [(name, [f for f in RECIPE_FIELDS.values() if f.section == name]) for name in SECTIONS]
    if machine is not None:
        tables.append(("machine", list(MACHINE_FIELDS.values())))
    for name, table in tables:
        owner = machine if name == "machine" else getattr(recipe, name)
        lines += ["", f"[{name}]"] + [f"{f.flat} = {_toml(getattr(owner, f.name))}" for f in table]
    return "\n".join(lines)
