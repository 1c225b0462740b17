"""The one recipe: a typed dataclass whose defaults are the 90-epoch ResNet-50 recipe.

Layers, lowest first: the defaults here, a preset file (TOML, `rn50/presets/<name>.toml`), then single CLI
flags. Every field is a flag (`batch_size` is `--batch-size`); an unknown key or flag is an error that
suggests the closest name. The resolved recipe is saved as `recipe.json` in every run and checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from rn50.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"
LOADERS = ("dali", "dali-cpu", "torchvision", "synthetic")


def opt(default, help: str = ""):
    """A recipe field with its help text (shown by --help next to the field's flag)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Recipe:
    # Model
    arch: str = opt("resnet50", "any torchvision resnet: resnet18/34/50/101/152")
    zero_init_residual: bool = opt(True, "gamma=0 in the last BN of every residual block (+0.2% top-1)")
    sync_bn: bool = opt(False, "SyncBatchNorm: only worth it below ~32 images per GPU")
    # Batch and schedule. batch_size is per GPU (per process); the LR scales with the global batch.
    epochs: int = opt(90, "training epochs")
    batch_size: int = opt(256, "images per GPU (per process)")
    base_lr: float = opt(0.1, "peak LR = base_lr * global_batch / base_batch (linear scaling rule)")
    base_batch: int = opt(256, "the global batch at which base_lr applies")
    warmup_epochs: float = opt(5.0, "linear from 0 to the peak, updated every step")
    lr_milestones: tuple[float, ...] = opt((30.0, 60.0, 80.0), "epochs where the LR is multiplied by lr_decay")
    lr_decay: float = opt(0.1, "step schedule: LR multiplier at each milestone")
    # Optimizer: SGD with Nesterov momentum; no weight decay on BN parameters and biases
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(True, "SGD with Nesterov momentum")
    weight_decay: float = opt(1e-4, "on conv and linear weights only (none on BN parameters and biases)")
    label_smoothing: float = opt(0.1, "cross-entropy label smoothing")
    optimizer: str = opt("sgd", "sgd (Nesterov) | adamw (torch) | lamb (timm's)")
    schedule: str = opt("step", "step (milestones) | cosine (to min_lr, then cooldown) | plateau (on val loss)")
    min_lr: float = opt(0.0, "cosine: the LR at the end of the cosine phase and through the cooldown")
    cooldown_epochs: float = opt(0.0, "cosine: epochs held at min_lr at the end")
    plateau_factor: float = opt(0.1, "plateau: LR multiplier when validation loss stops improving")
    plateau_patience: int = opt(5, "plateau: epochs without improvement before the LR drops")
    # Regularisation beyond the 90-epoch recipe (all off by default)
    ema_decay: float = opt(0.0, "EMA of the weights, evaluated beside the raw model (e.g. 0.9998); 0: off")
    mixup_alpha: float = opt(0.0, "Mixup on the GPU batch (Beta(alpha, alpha)); 0: off")
    cutmix_alpha: float = opt(0.0, "CutMix; with both on, each batch takes one of the two at random")
    randaugment_magnitude: int = opt(0, "RandAugment inside the DALI pipeline (e.g. 7, of 30); 0: off")
    randaugment_layers: int = opt(2, "operations per image")
    randaugment_magnitude_std: float = opt(0.0, "random spread of the magnitude per image")
    repeated_aug: int = opt(1, "each image k times per epoch's stream, augmented independently (DALI loaders)")
    kd_teacher: str = opt("", "distillation: teacher weights (our checkpoint or a torchvision state dict)")
    kd_teacher_arch: str = opt("resnet152", "distillation: the teacher's torchvision architecture")
    kd_alpha: float = opt(0.8, "loss = kd_alpha * T^2 * KL(teacher || student at T) + (1 - kd_alpha) * CE")
    kd_temperature: float = opt(1.0, "distillation: softmax temperature T")
    # Fine-tuning and stopping rules
    finetune_from: str = opt("", "start from these weights; a classifier of another size is replaced")
    freeze_backbone_epochs: float = opt(0.0, "train only the classifier for the first epochs")
    early_stop_patience: int = opt(0, "stop after this many epochs without a better val top-1; 0: off")
    target_top1: float = opt(0.0, "stop once val top-1 reaches this (time-to-accuracy); 0: off")
    # Precision and memory layout
    amp: bool = opt(True, "autocast + GradScaler on CUDA; CPU runs stay fp32")
    amp_dtype: str = opt("float16", "float16 or bfloat16")
    channels_last: bool = opt(True, "NHWC memory layout for the model and the batch")
    # Input pipeline
    loader: str = opt("dali", "dali (GPU) | dali-cpu | torchvision | synthetic")
    image_size: int = opt(224, "training crop and validation crop size")
    val_resize_ratio: float = opt(0.875, "validation: resize shorter side to image_size / ratio, centre crop")
    color_jitter: float = opt(0.4, "brightness, contrast and saturation strength; 0 switches it off")
    dali_threads: int = opt(4, "DALI CPU threads per process")
    hw_decoder_load: float = opt(0.65, "share of JPEG decoding on the A100/H100 hardware decoder")
    fused_decode: bool = opt(True, "decode fused with RandomResizedCrop (decodes only the crop's region)")
    prefetch: int = opt(2, "DALI prefetch queue depth")
    workers: int = opt(8, "torchvision loader processes per GPU")
    # Bookkeeping
    seed: int = opt(0, "initial weights (the same on every rank) and augmentation streams")
    log_every: int = opt(50, "steps between host syncs for logging")


    def peak_lr(self, world_size: int) -> float:
        return self.base_lr * self.batch_size * world_size / self.base_batch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path, **extra) -> None:
        path.write_text(json.dumps({**self.to_dict(), **extra}, indent=2) + "\n")

    def validate(self) -> "Recipe":
        if self.loader not in LOADERS:
            raise UserError(f"unknown loader {self.loader!r}; choose one of {', '.join(LOADERS)}")
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise UserError(f"amp_dtype must be float16 or bfloat16, not {self.amp_dtype!r}")
        for name in ("epochs", "batch_size", "image_size", "base_batch", "dali_threads", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise UserError(f"hw_decoder_load must lie in [0, 1], got {self.hw_decoder_load}")
        for name, allowed in (("optimizer", ("sgd", "adamw", "lamb")), ("schedule", ("step", "cosine", "plateau"))):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.schedule == "cosine" and self.warmup_epochs + self.cooldown_epochs >= self.epochs:
            raise UserError(f"cosine needs epochs ({self.epochs}) > warmup_epochs + cooldown_epochs "
                            f"({self.warmup_epochs} + {self.cooldown_epochs}); lengthen --epochs")
        if not 0.0 <= self.kd_alpha <= 1.0 or self.kd_temperature <= 0:
            raise UserError("kd_alpha must lie in [0, 1] and kd_temperature be positive")
        if list(self.lr_milestones) != sorted(self.lr_milestones):
            raise UserError(f"lr_milestones must be increasing, got {list(self.lr_milestones)}")
        return self


_TYPES = typing.get_type_hints(Recipe)


def _closest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _coerce(name: str, value):
    """Bring a TOML or JSON value to the field's type (tuples arrive as lists)."""
    kind = _TYPES[name]
    if typing.get_origin(kind) is tuple:
        return tuple(float(v) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"recipe field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def from_mapping(values: dict, base: Recipe | None = None) -> Recipe:
    """Layer a mapping (a preset or a saved recipe.json) on `base`; unknown keys are errors."""
    known = {f.name for f in fields(Recipe)}
    for key in values:
        if key not in known:
            raise UserError(f"unknown recipe key {key!r}{_closest(key, known)}")
    coerced = {k: _coerce(k, v) for k, v in values.items()}
    return dataclasses.replace(base or Recipe(), **coerced)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str, base: Recipe | None = None) -> Recipe:
    path = Path(name) if name.endswith(".toml") else PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        presets = available_presets()
        raise UserError(
            f"no preset {name!r}{_closest(name, presets)}; presets are {', '.join(presets)} "
            "or a path to a .toml file"
        )
    with path.open("rb") as handle:
        return from_mapping(tomllib.load(handle), base)


def _flag_type(kind):
    if typing.get_origin(kind) is tuple:
        return lambda text: tuple(float(v) for v in text.split(",") if v.strip())
    return kind


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field, defaulting to None so that only flags the user gave override a preset."""
    group = parser.add_argument_group("recipe (defaults: the 90-epoch recipe)")
    group.add_argument("--preset", default=None, help=f"recipe preset: {', '.join(available_presets())}")
    defaults = Recipe()
    for f in fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        kind = _TYPES[f.name]
        shown = getattr(defaults, f.name)
        text = f"{f.metadata.get('help', '')} (default {shown})".strip().replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            metavar = "A,B,..." if typing.get_origin(kind) is tuple else kind.__name__.upper()
            group.add_argument(flag, type=_flag_type(kind), default=None, metavar=metavar, help=text)


def recipe_from_args(args: argparse.Namespace, base: Recipe | None = None) -> Recipe:
    recipe = base or Recipe()
    if args.preset:
        recipe = load_preset(args.preset, recipe)
    given = {f.name: getattr(args, f.name) for f in fields(Recipe) if getattr(args, f.name) is not None}
    return dataclasses.replace(recipe, **given).validate()


def parse_strict(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_args, but an unknown flag is a UserError naming the closest known flag."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [o for a in parser._actions for o in a.option_strings]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise UserError(f"unknown argument {bad!r}{_closest(bad.split('=')[0], flags)}")
    return args


def format_recipe(recipe: Recipe) -> str:
    """The resolved recipe, one `field = value` line each (TOML, so it can be saved as a preset)."""
    def toml(value):
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, tuple):
            return "[" + ", ".join(repr(v) for v in value) + "]"
        return f'"{value}"' if isinstance(value, str) else repr(value)

    return "\n".join(f"{name} = {toml(value)}" for name, value in recipe.to_dict().items())


def main(argv=None) -> None:
    """`python -m rn50.recipe [--preset NAME] [--field value ...]`: print the resolved recipe."""
    import sys

    parser = argparse.ArgumentParser(prog="rn50.recipe", description=main.__doc__, allow_abbrev=False)
    add_recipe_flags(parser)
    try:
        print(format_recipe(recipe_from_args(parse_strict(parser, argv))))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
