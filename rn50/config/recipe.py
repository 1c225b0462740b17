"""The configuration: the one recipe (typed, frozen sections whose defaults are the 90-epoch ResNet-50
recipe), with the machine settings kept apart from it (rn50.config.machine: how this machine runs the
recipe, not what is trained) and rn50.train's run settings (rn50.config.run_settings: where it reads and
writes, how it resumes), together a `Config`.

`resolve` is the one way to build a Config, with one precedence rule, lowest first: the defaults here (the
loader settings' from pipelines.settings), the saved recipe where resuming (a checkpoint's; never its machine
settings), presets (TOML, `rn50/presets/<name>.toml`, several applied left to right with `--preset a,b`),
then single CLI flags; then one validation (Config.validate). Every field has one flat name, used as its
flag (`batch_size` is `--batch-size`), its key in presets and in recipe.json; presets may also group keys in
tables named after the sections. An unknown key or flag is an error that suggests the closest name.

A run saves the resolved recipe as `recipe.json` and the machine settings as `machine.json`; the resume
guard (which changes a resumed run accepts) is rn50.reliability.lifecycle's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipelines.augmentation import Augmentation, opt
from rn50.config.choices import LR_SCALINGS, OPTIMIZERS, SCHEDULES, listed
from rn50.config.errors import UserError
from rn50.config.machine import Machine
from rn50.config.names import closest, foreign_key
from rn50.config.run_settings import RunSettings

PRESET_DIR = Path(__file__).parent.parent / "presets"  # rn50/presets/: data that users read and edit
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # torchvision's, by rn50.core.model
# Bare flags that set a field to one value, for a habit users bring: timm's `--pretrained` is the arch's DEFAULT
# weights. Flag name -> (flat name, value); flags only (a preset writes the field: `weights = "DEFAULT"`).
SHORTHANDS = {"pretrained": ("weights", "DEFAULT")}


@dataclass(frozen=True)
class Model:
    arch: str = opt("resnet50", "any torchvision resnet: resnet18/34/50/101/152")
    zero_init_residual: bool = opt(True, "gamma=0 in the last BN of every residual block (+0.2% top-1)")
    sync_bn: bool = opt(False, "SyncBatchNorm: only worth it below ~32 images per GPU")
    finetune_from: str = opt("", "start from these weights; a classifier of another size is replaced")
    weights: str = opt("", "start from torchvision's weights of the arch by name (IMAGENET1K_V1, IMAGENET1K_V2, "
                           "DEFAULT) in the torch hub cache, downloaded where the network works; a classifier of "
                           "another size is replaced")
    freeze_backbone_epochs: float = opt(0.0, "fine-tuning: train only the classifier for the first epochs")
    blurpool: bool = opt(False, "BlurPool: a fixed 3x3 blur before every strided convolution (anti-aliased "
                                "downsampling, FFCV's use_blurpool); no new parameters")


@dataclass(frozen=True)
class Optimisation:
    """batch_size is per GPU (per process) and per micro-batch; the LR scales with the global batch."""
    batch_size: int = opt(256, "images per GPU (per process) in each forward and backward pass (a micro-batch)")
    accum_steps: int = opt(1, "gradient accumulation: micro-batches of batch_size per optimizer step, so the "
                              "global batch is batch_size x processes x accum_steps; the LR scaling, warm-up, "
                              "schedule and step counts count optimizer steps; BatchNorm statistics stay per "
                              "micro-batch")
    optimizer: str = opt("sgd", listed(OPTIMIZERS))
    base_lr: float = opt(0.1, "the peak LR at base_batch; other global batches scale it by lr_scaling")
    base_batch: int = opt(256, "the global batch at which base_lr applies")
    lr_scaling: str = opt("linear", listed(LR_SCALINGS))
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(True, "SGD with Nesterov momentum")
    weight_decay: float = opt(1e-4, "on conv and linear weights only (none on BN parameters and biases)")
    clip_grad_norm: float = opt(0.0, "clip the gradients' global L2 norm to this before each optimizer step "
                                     "(unscaled from AMP's loss scale first; the accumulated gradient); 0: off")

    def global_batch(self, world_size: int) -> int:
        """The images of one optimizer step over all processes: the one place the global batch is computed."""
        return self.batch_size * world_size * self.accum_steps

    def peak_lr(self, world_size: int) -> float:
        """base_lr scaled from base_batch to this run's global batch by the lr_scaling rule (LR_SCALINGS)."""
        ratio = self.global_batch(world_size) / self.base_batch
        return self.base_lr * (math.sqrt(ratio) if self.lr_scaling == "sqrt" else ratio)


@dataclass(frozen=True)
class Schedule:
    epochs: int = opt(90, "training epochs")
    warmup_epochs: float = opt(5.0, "linear from warmup_start_factor x the peak to the peak, updated every step")
    warmup_start_factor: float = opt(0.0, "the warm-up's first LR as a fraction of the peak (torchvision's "
                                          "--lr-warmup-decay, e.g. 0.01); 0: the warm-up starts from 0")
    kind: str = opt("step", listed(SCHEDULES), flat="schedule")
    lr_milestones: tuple[float, ...] = opt((30.0, 60.0, 80.0), "epochs where the LR is multiplied by lr_decay")
    lr_decay: float = opt(0.1, "step schedule: LR multiplier at each milestone")
    min_lr: float = opt(0.0, "cosine: the LR at the end of the cosine phase and through the cooldown")
    cooldown_epochs: float = opt(0.0, "cosine: epochs held at min_lr at the end")
    plateau_factor: float = opt(0.1, "plateau: LR multiplier when validation loss stops improving")
    plateau_patience: int = opt(5, "plateau: epochs without improvement before the LR drops")


@dataclass(frozen=True)
class Regularisation:
    label_smoothing: float = opt(0.1, "cross-entropy label smoothing")
    ema_decay: float = opt(0.0, "EMA of the weights, evaluated beside the raw model (e.g. 0.9998); 0: off")
    mixup_alpha: float = opt(0.0, "Mixup on the GPU batch (Beta(alpha, alpha)); 0: off")
    cutmix_alpha: float = opt(0.0, "CutMix; with both on, each batch takes one of the two at random")
    class_weights: str = opt("none", "none | balanced: weight each class's loss by N / (classes x its images), "
                                     "for imbalanced data (a weighted loss, not resampling: DALI's reader and its "
                                     "exact resume stay as they are)")


@dataclass(frozen=True)
class Distillation:
    teacher: str = opt("", "distillation: teacher weights (our checkpoint or a torchvision state dict)",
                       flat="kd_teacher")
    teacher_arch: str = opt("resnet152", "distillation: the teacher's torchvision architecture",
                            flat="kd_teacher_arch")
    alpha: float = opt(0.8, "loss = kd_alpha * T^2 * KL(teacher || student at T) + (1 - kd_alpha) * CE",
                       flat="kd_alpha")
    temperature: float = opt(1.0, "distillation: softmax temperature T", flat="kd_temperature")


@dataclass(frozen=True)
class Precision:
    amp: bool = opt(True, "autocast + GradScaler on CUDA; CPU runs stay fp32")
    amp_dtype: str = opt("float16", "float16 or bfloat16")
    channels_last: bool = opt(True, "NHWC memory layout for the model and the batch")


@dataclass(frozen=True)
class Stopping:
    early_stop_patience: int = opt(0, "stop after this many epochs without a better val top-1; 0: off")
    target_top1: float = opt(0.0, "stop once val top-1 reaches this (time-to-accuracy); 0: off")


@dataclass(frozen=True)
class Recipe:
    """What is trained. Functions take the section they need (rn50.core.schedule the schedule, ...)."""
    model: Model = field(default_factory=Model)
    augmentation: Augmentation = field(default_factory=Augmentation)
    optimisation: Optimisation = field(default_factory=Optimisation)
    schedule: Schedule = field(default_factory=Schedule)
    regularisation: Regularisation = field(default_factory=Regularisation)
    distillation: Distillation = field(default_factory=Distillation)
    precision: Precision = field(default_factory=Precision)
    stopping: Stopping = field(default_factory=Stopping)
    seed: int = opt(0, "initial weights (the same on every rank) and augmentation streams")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path, **extra) -> None:
        """One JSON object on one line, as metrics.jsonl's lines and eval.json are: line-oriented tools (grep, a
        JSONL reader) read it whole; `python -m rn50.recipe` prints a recipe for people (TOML)."""
        path.write_text(json.dumps({**self.to_dict(), **extra}) + "\n")

    def validate(self) -> "Recipe":
        checks = (("optimizer", self.optimisation.optimizer, tuple(OPTIMIZERS)),
                  ("schedule", self.schedule.kind, tuple(SCHEDULES)),
                  ("lr_scaling", self.optimisation.lr_scaling, tuple(LR_SCALINGS)),
                  ("amp_dtype", self.precision.amp_dtype, ("float16", "bfloat16")),
                  ("class_weights", self.regularisation.class_weights, ("none", "balanced")))
        for name, value, allowed in checks:
            if value not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        for arch in (self.model.arch, self.distillation.teacher_arch):  # rn50.core.model.build_model builds these
            if arch not in ARCHS:
                raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        for name in ("epochs", "batch_size", "base_batch", "accum_steps"):  # image_size: Augmentation.validate
            if get(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {get(self, name)}")
        if not self.optimisation.clip_grad_norm >= 0:  # NaN too
            raise UserError(f"clip_grad_norm must be positive, or 0 for no clipping; got "
                            f"{self.optimisation.clip_grad_norm}")
        s = self.schedule
        if s.kind == "cosine" and s.warmup_epochs + s.cooldown_epochs >= s.epochs:
            raise UserError(f"cosine needs epochs ({s.epochs}) > warmup_epochs + cooldown_epochs "
                            f"({s.warmup_epochs} + {s.cooldown_epochs}); lengthen --epochs")
        if not 0.0 <= self.distillation.alpha <= 1.0 or self.distillation.temperature <= 0:
            raise UserError("kd_alpha must lie in [0, 1] and kd_temperature be positive")
        if self.model.weights and self.model.finetune_from:
            raise UserError(f"--weights {self.model.weights} (or --pretrained) and --finetune-from both name the "
                            "starting weights; pass one: --weights NAME for torchvision's, --finetune-from FILE for "
                            "a file")
        if s.kind == "linear" and s.warmup_epochs >= s.epochs:
            raise UserError(f"the linear schedule needs epochs ({s.epochs}) > warmup_epochs ({s.warmup_epochs})")
        if not 0.0 <= s.warmup_start_factor <= 1.0:
            raise UserError(f"warmup_start_factor is a fraction of the peak LR in [0, 1] (torchvision's "
                            f"--lr-warmup-decay 0.01 is 0.01), got {s.warmup_start_factor}")
        if list(s.lr_milestones) != sorted(s.lr_milestones):
            raise UserError(f"lr_milestones must be increasing, got {list(s.lr_milestones)}")
        self.augmentation.validate()
        return self


# --- flat names -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    flat: str  # the flag, the preset key, the key users know
    section: str | None  # a Recipe section, None for a top-level Recipe field, "machine" for Machine
    name: str  # the attribute inside its section
    kind: type
    help: str
    default: object


def _fields_of(cls, section: str | None) -> list[Field]:
    """The settings of a dataclass: its fields declared with `opt` (which carry help text); a Recipe's
    sections carry none, so `_fields_of(Recipe, None)` gives its top-level settings."""
    hints, defaults = typing.get_type_hints(cls), cls()
    return [Field(f.metadata.get("flat") or f.name, section, f.name, hints[f.name], f.metadata["help"],
                  getattr(defaults, f.name)) for f in fields(cls) if "help" in f.metadata]


_RECIPE_HINTS = typing.get_type_hints(Recipe)
SECTIONS = {f.name: _RECIPE_HINTS[f.name] for f in fields(Recipe) if dataclasses.is_dataclass(_RECIPE_HINTS[f.name])}
RECIPE_FIELDS = {f.flat: f for f in [g for name, cls in SECTIONS.items() for g in _fields_of(cls, name)]
                 + _fields_of(Recipe, None)}
MACHINE_FIELDS = {f.flat: f for f in _fields_of(Machine, "machine")}
ALL_FIELDS = {**RECIPE_FIELDS, **MACHINE_FIELDS}
assert len(ALL_FIELDS) == len(RECIPE_FIELDS) + len(MACHINE_FIELDS), "a flat name is used twice"


def get(recipe: Recipe, flat: str):
    """A recipe field by its flat name."""
    f = RECIPE_FIELDS[flat]
    return getattr(recipe if f.section is None else getattr(recipe, f.section), f.name)


def flat_items(recipe: Recipe) -> dict:
    return {flat: get(recipe, flat) for flat in RECIPE_FIELDS}


def did_you_mean(name: str, candidates) -> str:
    """"; did you mean 'x'?" for the candidate a typo of `name` would be (rn50.config.names.closest), or nothing."""
    match = closest(name, list(candidates))
    return f"; did you mean {match!r}?" if match else ""


def key_hint(key: str, keys) -> str:
    """The hint after an unknown preset key: ours for another script's name or a habit (`lr`: base_lr), that
    we do not have it (yet), or a typo's closest key."""
    return foreign_key(key, keys) or did_you_mean(key, keys)


def _coerce(flat: str, value):
    """Bring a TOML or JSON value to the field's type (tuples arrive as lists)."""
    kind = ALL_FIELDS[flat].kind
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"recipe field {flat!r} must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"recipe field {flat!r} must be {kind.__name__}, got {value!r}")
    return value


def _flat(values: dict) -> dict:
    """Flat name -> value, brought to each field's type, from a mapping with flat keys and/or tables named
    after the sections or `machine` (as presets, recipe.json and checkpoints hold them). Unknown keys are
    errors: resolve drops the keys of a saved recipe that are not settings (world_size, peak_lr, ...) first."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and (key in SECTIONS or key == "machine"):
            section_cls = Machine if key == "machine" else SECTIONS[key]
            by_name = {f.name: f.flat for f in _fields_of(section_cls, key)}
            for name, inner in value.items():
                if name not in by_name and name not in ALL_FIELDS:
                    raise UserError(f"unknown key {name!r} in [{key}]{key_hint(name, {**by_name, **ALL_FIELDS})}")
                flat[by_name.get(name, name)] = inner
        elif key in ALL_FIELDS:
            flat[key] = value
        else:
            raise UserError(f"unknown recipe key {key!r}{key_hint(key, ALL_FIELDS)}")
    return {k: _coerce(k, v) for k, v in flat.items()}


def _layer(recipe: Recipe, machine: Machine, values: dict) -> tuple[Recipe, Machine]:
    """Flat values laid over a recipe and machine settings (one layer of resolve)."""
    machine = dataclasses.replace(machine, **{k: v for k, v in values.items() if k in MACHINE_FIELDS})
    by_section: dict[str | None, dict] = {}
    for flat, value in values.items():
        if flat in RECIPE_FIELDS:
            f = RECIPE_FIELDS[flat]
            by_section.setdefault(f.section, {})[f.name] = value
    top = by_section.pop(None, {})
    sections = {name: dataclasses.replace(getattr(recipe, name), **changes) for name, changes in by_section.items()}
    return dataclasses.replace(recipe, **sections, **top), machine


def with_fields(recipe: Recipe | None = None, **flat) -> Recipe:
    """A recipe with some fields changed by flat name, through resolve (checked as any run's):
    `with_fields(batch_size=8, arch="resnet18")`, `with_fields(saved, epochs=6)`."""
    unknown = [name for name in flat if name not in RECIPE_FIELDS]
    if unknown:
        raise UserError(f"unknown recipe field {unknown[0]!r}{key_hint(unknown[0], RECIPE_FIELDS)}")
    return resolve(flat, saved=recipe).recipe


# --- presets ----------------------------------------------------------------------------------------

BASE_SUFFIX = "_base"  # rn50/presets/<x>_base.toml: shared values that presets build on (`base = "<x>_base"`)


def available_presets() -> list[str]:
    """The presets a user names with --preset: the files in rn50/presets/, except the bases (`*_base.toml`),
    which hold values shared by several presets and are not recipes on their own."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml") if not p.stem.endswith(BASE_SUFFIX))


def _preset_path(name: str, relative_to: Path | None = None) -> Path:
    if not name.endswith(".toml"):
        return PRESET_DIR / f"{name}.toml"
    path = Path(name)
    return relative_to / path if relative_to is not None and not path.is_absolute() else path


def _read_preset_file(path: Path, chain: tuple[Path, ...]) -> dict:
    """A preset file's values by flat name: its base's first (`base = "NAME"`, a preset name or a .toml path
    relative to the file), then its own over them."""
    with path.open("rb") as handle:
        try:
            raw = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"preset {path} is not valid TOML ({exc}); fix the file") from None
    base = raw.pop("base", None)
    values = {}
    if base is not None:
        base_path = _preset_path(base, path.parent) if isinstance(base, str) else None
        if base_path is None or not base_path.is_file():
            bases = sorted(p.stem for p in PRESET_DIR.glob(f"*{BASE_SUFFIX}.toml"))
            raise UserError(f"preset {path}: unknown base {base!r}{did_you_mean(str(base), bases)}; a base is one of "
                            f"{', '.join(bases) or 'none'} or a path to a .toml file")
        if base_path.resolve() in chain:
            cycle = " -> ".join(p.stem for p in chain + (base_path.resolve(),))
            raise UserError(f"preset {path}: its bases form a cycle ({cycle})")
        values = _read_preset_file(base_path, chain + (base_path.resolve(),))
    return {**values, **_flat(raw)}


def read_preset(name: str) -> dict:
    """A preset's values by flat name, its base's included (a preset may start with `base = "ffcv_base"`)."""
    path = _preset_path(name)
    if not name.endswith(".toml") and name.endswith(BASE_SUFFIX) and path.is_file():
        users = [p for p in available_presets() if _mentions_base(p, name)]
        raise UserError(f"{name} is a base that other presets build on ({', '.join(users) or 'none'}), not a "
                        "preset of its own; name one of those")
    if not path.is_file():
        presets = available_presets()
        raise UserError(f"no preset {name!r}{did_you_mean(name, presets)}; presets are {', '.join(presets)} "
                        "or a path to a .toml file")
    return _read_preset_file(path, (path.resolve(),))


def _mentions_base(preset: str, base: str) -> bool:
    with (PRESET_DIR / f"{preset}.toml").open("rb") as handle:
        return tomllib.load(handle).get("base") == base


# --- the one configuration path ---------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Everything a command runs with: the recipe (what is trained), the machine settings (how this machine
    runs it) and, for rn50.train, the run settings; built by resolve, and only there."""
    recipe: Recipe
    machine: Machine
    run: RunSettings | None = None
    presets: tuple[str, ...] = ()  # the --preset names, in the order applied
    overridden: list[str] = field(default_factory=list)  # "preset b overrides a: batch_size 192 -> 256"
    given: frozenset[str] = frozenset()  # flat names that a preset or a flag set

    def validate(self) -> "Config":
        """Every check of the configuration: the recipe's, then the machine's (the loader settings' own)."""
        self.recipe.validate()
        self.machine.validate()
        return self


def resolve(flags=None, *, saved: Recipe | dict | None = None, defaults: dict | None = None,
            run: type[RunSettings] | None = None) -> Config:
    """The one way to build a configuration, with one precedence rule. Layers, lowest first:

    1. the built-in defaults (the dataclasses above; the loader settings' from pipelines.settings), with
       `defaults` in their place: flat values a command puts below everything (the harness's CPU sizes);
    2. `saved`, where resuming or reading a run: a checkpoint's or recipe.json's recipe (sectioned, or flat
       as older runs wrote it), or a Recipe. Its machine settings and bookkeeping keys are ignored: a run
       never inherits how another machine ran;
    3. each preset of flags["preset"] (`"a,b"`), left to right;
    4. the flags given (`flags`: an argparse Namespace or a dict by flat name; None means not given).

    `run`: the command's run-settings class, filled from the flags of its fields' names (rn50.train's
    RunSettings). Validated once, at the end (Config.validate)."""
    values = dict(vars(flags) if isinstance(flags, argparse.Namespace) else flags or {})
    recipe, machine = _layer(Recipe(), Machine(), _flat(defaults or {}))
    if isinstance(saved, Recipe):
        recipe = saved
    elif saved is not None:
        known = {k: v for k, v in saved.items() if k in SECTIONS or k in ALL_FIELDS}
        recipe = _layer(recipe, machine, {k: v for k, v in _flat(known).items() if k in RECIPE_FIELDS})[0]
    names = tuple(n.strip() for n in (values.get("preset") or "").split(",") if n.strip())
    set_by: dict[str, tuple[str, object]] = {}
    overridden = []
    for name in names:
        preset = read_preset(name)
        for flat, value in preset.items():
            if flat in set_by and set_by[flat][1] != value:
                overridden.append(f"preset {name} overrides {set_by[flat][0]}: {flat} {set_by[flat][1]!r} -> {value!r}")
            set_by[flat] = (name, value)
        recipe, machine = _layer(recipe, machine, preset)
    given = {flat: _coerce(flat, values[flat]) for flat in ALL_FIELDS if values.get(flat) is not None}
    recipe, machine = _layer(recipe, machine, given)
    return Config(recipe, machine, run.from_flags(values) if run else None, names, overridden,
                  frozenset(set_by) | frozenset(given)).validate()
