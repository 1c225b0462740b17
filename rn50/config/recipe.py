"""The configuration: the one recipe (typed, frozen sections whose defaults are the 90-epoch ResNet-50
recipe), the machine settings kept apart from it (how this machine runs the recipe, not what is trained),
and rn50.train's run settings (where it reads and writes, how it resumes), together a `Config`.

`resolve` is the one way to build a Config, with one precedence rule, lowest first: the defaults here (the
loader settings' from pipelines.settings), the saved recipe where resuming (a checkpoint's; never its machine
settings), presets (TOML, `rn50/config/presets/<name>.toml`, several applied left to right with `--preset a,b`),
then single CLI flags; then one validation (Config.validate). Every field has one flat name, used as its
flag (`batch_size` is `--batch-size`), its key in presets and in recipe.json; presets may also group keys in
tables named after the sections. An unknown key or flag is an error that suggests the closest name.

A run saves the resolved recipe as `recipe.json` and the machine settings as `machine.json`; the resume
guard (which changes a resumed run accepts) is rn50.reliability.lifecycle's.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipelines.registry import KINDS, choices_help
from pipelines.augmentation import Augmentation, opt
from pipelines.settings import LoaderSettings
from rn50.config.errors import UserError
from rn50.config.profile_flags import TOOLS as PROFILERS, add_profiling_flags
from rn50.reliability.restart import parse_every

PRESET_DIR = Path(__file__).parent / "presets"
LOADERS = KINDS
AUTO_LOADER = "auto"  # Machine.for_device: dali where the process runs on CUDA, dali-cpu elsewhere
DEVICES = ("auto", "cuda", "cpu")  # rn50.system.device.choose_device
COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")  # torch.compile's
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # torchvision's, by rn50.core.model
TRACKERS = ("none", "wandb", "mlflow")  # rn50.observe.tracking's backends
RANDAUGMENT_MAX = 30  # DALI's auto_aug: magnitudes are bins 0..30 (num_magnitude_bins 31)


def _run_opt(default, help: str, **flag):
    """A run setting: its default, its help and how argparse reads its flag (add_run_flags)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class Model:
    arch: str = opt("resnet50", "any torchvision resnet: resnet18/34/50/101/152")
    zero_init_residual: bool = opt(True, "gamma=0 in the last BN of every residual block (+0.2% top-1)")
    sync_bn: bool = opt(False, "SyncBatchNorm: only worth it below ~32 images per GPU")
    finetune_from: str = opt("", "start from these weights; a classifier of another size is replaced")
    freeze_backbone_epochs: float = opt(0.0, "fine-tuning: train only the classifier for the first epochs")
    blurpool: bool = opt(False, "BlurPool: a fixed 3x3 blur before every strided convolution (anti-aliased "
                                "downsampling, FFCV's use_blurpool); no new parameters")


@dataclass(frozen=True)
class Optimisation:
    """batch_size is per GPU (per process); the LR scales with the global batch."""
    batch_size: int = opt(256, "images per GPU (per process)")
    optimizer: str = opt("sgd", "sgd (Nesterov) | adamw (torch) | lamb (timm's)")
    base_lr: float = opt(0.1, "peak LR = base_lr * global_batch / base_batch (linear scaling rule)")
    base_batch: int = opt(256, "the global batch at which base_lr applies")
    momentum: float = opt(0.9, "SGD momentum")
    nesterov: bool = opt(True, "SGD with Nesterov momentum")
    weight_decay: float = opt(1e-4, "on conv and linear weights only (none on BN parameters and biases)")

    def peak_lr(self, world_size: int) -> float:
        return self.base_lr * self.batch_size * world_size / self.base_batch


@dataclass(frozen=True)
class Schedule:
    epochs: int = opt(90, "training epochs")
    warmup_epochs: float = opt(5.0, "linear from 0 to the peak, updated every step")
    kind: str = opt("step", "step (milestones) | cosine (to min_lr, then cooldown) | plateau (on val loss) | "
                            "linear (from the peak straight down to 0 at the last epoch)", flat="schedule")
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
        path.write_text(json.dumps({**self.to_dict(), **extra}, indent=2) + "\n")

    def validate(self) -> "Recipe":
        checks = (("optimizer", self.optimisation.optimizer, ("sgd", "adamw", "lamb")),
                  ("schedule", self.schedule.kind, ("step", "cosine", "plateau", "linear")),
                  ("amp_dtype", self.precision.amp_dtype, ("float16", "bfloat16")),
                  ("class_weights", self.regularisation.class_weights, ("none", "balanced")))
        for name, value, allowed in checks:
            if value not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        for arch in (self.model.arch, self.distillation.teacher_arch):  # rn50.core.model.build_model builds these
            if arch not in ARCHS:
                raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        for name in ("epochs", "batch_size", "base_batch"):  # image_size: Augmentation.validate below
            if get(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {get(self, name)}")
        s = self.schedule
        if s.kind == "cosine" and s.warmup_epochs + s.cooldown_epochs >= s.epochs:
            raise UserError(f"cosine needs epochs ({s.epochs}) > warmup_epochs + cooldown_epochs "
                            f"({s.warmup_epochs} + {s.cooldown_epochs}); lengthen --epochs")
        if not 0.0 <= self.distillation.alpha <= 1.0 or self.distillation.temperature <= 0:
            raise UserError("kd_alpha must lie in [0, 1] and kd_temperature be positive")
        if s.kind == "linear" and s.warmup_epochs >= s.epochs:
            raise UserError(f"the linear schedule needs epochs ({s.epochs}) > warmup_epochs ({s.warmup_epochs})")
        if list(s.lr_milestones) != sorted(s.lr_milestones):
            raise UserError(f"lr_milestones must be increasing, got {list(s.lr_milestones)}")
        a = self.augmentation  # ranges the loaders cannot take (DALI and torchvision would fail mid-build)
        if not 0.0 <= a.color_jitter <= 1.0:  # brightness, contrast, saturation factors in [1 - cj, 1 + cj]
            raise UserError(f"color_jitter must lie in [0, 1] (0: off; the recipe's is 0.4), got {a.color_jitter}")
        if not 0 <= a.randaugment_magnitude <= RANDAUGMENT_MAX:
            raise UserError(f"randaugment_magnitude must lie in 0..{RANDAUGMENT_MAX} (0: off; e.g. 7 or 9), got "
                            f"{a.randaugment_magnitude}")
        if a.randaugment_layers < 1 or a.randaugment_magnitude_std < 0:
            raise UserError(f"randaugment_layers must be at least 1 and randaugment_magnitude_std not negative, got "
                            f"{a.randaugment_layers} and {a.randaugment_magnitude_std}")
        self.augmentation.validate()
        return self


def concrete_loader(kind: str, device_type: str) -> str:
    """`auto` as the loader it means on a device of this type (torch.device.type); any other kind as it is."""
    return ("dali" if device_type == "cuda" else "dali-cpu") if kind == AUTO_LOADER else kind


@dataclass(frozen=True)
class Machine:
    """How this machine runs the recipe: not part of what is trained, saved as machine.json in the run folder,
    free to change on resume and never inherited from a checkpoint."""
    loader: str = opt("auto", f"auto: dali on a CUDA device, dali-cpu without one | {choices_help()} (docs/loaders.md)")
    device: str = opt("auto", "auto: this process's GPU when CUDA works, else the CPU (an error when NVIDIA GPUs "
                              "are present but CUDA is unusable) | cuda | cpu: the CPU even on a GPU machine")
    # the loader settings: their defaults live in pipelines.settings.LoaderSettings, and only there
    dali_threads: int = opt(LoaderSettings.dali_threads, "DALI CPU threads per process")
    hw_decoder_load: float = opt(LoaderSettings.hw_decoder_load, "share of JPEG decoding on the A100/H100 "
                                                                 "hardware decoder")
    fused_decode: bool = opt(LoaderSettings.fused_decode, "decode fused with RandomResizedCrop (decodes only the "
                                                          "crop's region); --no-fused-decode decodes the whole "
                                                          "image, then crops")
    prefetch: int = opt(LoaderSettings.prefetch, "DALI prefetch queue depth; torchvision-gpu: batches prepared ahead")
    workers: int = opt(LoaderSettings.workers, "torchvision loader processes per GPU; torchvision-gpu: threads "
                                               "reading the files; -1: the cores this process may use over the "
                                               "local ranks, 1 to 8")
    log_every: int = opt(50, "steps between host syncs for logging")
    # speed levers (docs/benchmarks.md#speed-levers): how a step runs, not what it computes
    compile: bool = opt(False, "torch.compile the model (compile time is reported apart, never counted in img/s)")
    compile_mode: str = opt("default", "torch.compile mode: default | max-autotune | reduce-overhead")
    cuda_graphs: bool = opt(False, "capture the whole training step in a CUDA graph and replay it (CUDA only)")
    fused_optimizer: bool = opt(True, "the optimizer's fused CUDA kernel (one launch for all parameters; CUDA only)")
    cudnn_benchmark: bool = opt(True, "let cuDNN time its kernels once per shape and keep the fastest")
    ddp_bucket_mb: int = opt(25, "DDP gradient bucket size in MiB (all-reduce granularity)")
    ddp_bucket_view: bool = opt(True, "DDP gradient_as_bucket_view: gradients live in the buckets (no copy)")
    ddp_fp16_compress: bool = opt(False, "all-reduce gradients in fp16 (halves the traffic; for PCIe machines)")
    # experiment trackers (rn50/observe/tracking.py): where results go besides the run folder, not what is trained
    tracker: str = opt("none", "also log to an experiment tracker: none | wandb | mlflow (optional extras: "
                               "pip install -e '.[wandb]' or '.[mlflow]'; MLflow's server is MLFLOW_TRACKING_URI)")
    tracker_project: str = opt("rn50", "the W&B project or MLflow experiment the runs go to")
    tracker_group: str = opt("", "group tracker runs under this name (W&B group, MLflow tag rn50.group); "
                                 "tools.sweep sets it to the sweep folder's name")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def loader_settings(self) -> LoaderSettings:
        """The settings every loader receives (pipelines.settings.LoaderSettings), as this machine has them."""
        return LoaderSettings(**{f.name: getattr(self, f.name) for f in fields(LoaderSettings)})

    def for_device(self, device_type: str) -> "Machine":
        """These settings with `loader auto` made concrete for the device this process runs on ("cuda" or
        "cpu", torch.device.type): dali on CUDA, dali-cpu elsewhere. Runs save and compare the concrete one
        (machine.json, the checkpoint's loader), so a resume on the same machine continues the same stream."""
        return dataclasses.replace(self, loader=concrete_loader(self.loader, device_type))

    def validate(self) -> "Machine":
        if self.loader not in LOADERS + (AUTO_LOADER,):
            raise UserError(f"unknown loader {self.loader!r}; choose one of {', '.join((AUTO_LOADER,) + LOADERS)}")
        if self.device not in DEVICES:
            raise UserError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        self.loader_settings().validate()
        if self.log_every < 1:
            raise UserError(f"log_every must be at least 1, got {self.log_every}")
        if self.compile_mode not in COMPILE_MODES:
            raise UserError(f"unknown compile mode {self.compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        if self.ddp_bucket_mb < 1:
            raise UserError(f"ddp_bucket_mb must be at least 1, got {self.ddp_bucket_mb}")
        if self.tracker not in TRACKERS:
            raise UserError(f"unknown tracker {self.tracker!r}; choose one of {', '.join(TRACKERS)}")
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


def _closest(name: str, candidates) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


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
                    raise UserError(f"unknown key {name!r} in [{key}]{_closest(name, by_name)}")
                flat[by_name.get(name, name)] = inner
        elif key in ALL_FIELDS:
            flat[key] = value
        else:
            raise UserError(f"unknown recipe key {key!r}{_closest(key, ALL_FIELDS)}")
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
        raise UserError(f"unknown recipe field {unknown[0]!r}{_closest(unknown[0], RECIPE_FIELDS)}")
    return resolve(flat, saved=recipe).recipe


# --- presets ----------------------------------------------------------------------------------------

BASE_SUFFIX = "_base"  # rn50/config/presets/<x>_base.toml: shared values that presets build on (`base = "<x>_base"`)


def available_presets() -> list[str]:
    """The presets a user names with --preset: the files in rn50/config/presets/, except the bases (`*_base.toml`),
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
            raise UserError(f"preset {path}: unknown base {base!r}{_closest(str(base), bases)}; a base is one of "
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
        raise UserError(f"no preset {name!r}{_closest(name, presets)}; presets are {', '.join(presets)} "
                        "or a path to a .toml file")
    return _read_preset_file(path, (path.resolve(),))


def _mentions_base(preset: str, base: str) -> bool:
    with (PRESET_DIR / f"{preset}.toml").open("rb") as handle:
        return tomllib.load(handle).get("base") == base


# --- the one configuration path ---------------------------------------------------------------------

@dataclass(frozen=True)
class RunSettings:
    """How rn50.train keeps this run: where it reads and writes, how it resumes, checkpoints and watches
    itself. Neither what is trained (Recipe) nor how this machine runs it (Machine). One flag per field
    (add_run_flags); the profiling flags are rn50.config.profile_flags', shared with the harness."""
    data: Path | None = _run_opt(None, "folder with train/<class>/ and val/<class>/", required=True, type=Path)
    out: Path | None = _run_opt(None, "run folder for metrics, summary, checkpoints", required=True, type=Path)
    manifest: Path | None = _run_opt(None, "folder with train.txt/val.txt from `python -m tools.scan`: train on "
                                           "those files only", type=Path)
    resume: str | None = _run_opt(None, "checkpoint to continue from, or 'auto': the newest valid one in --out "
                                        "(none: start)")
    allow_change: str | None = _run_opt(None, "on --resume, accept these recipe fields differing from the "
                                              "checkpoint's (any other change that alters a step is refused; "
                                              "machine settings change freely)", metavar="FIELD[,FIELD]")
    reshard: bool = _run_opt(False, "allow resuming with another number of processes (restarts the interrupted "
                                    "epoch)", action="store_true")
    elastic_lr: str = _run_opt("scale", "when the world size changes on resume (an elastic change or --reshard): "
                                        "scale: the peak LR follows the new global batch (the linear scaling "
                                        "rule); keep: it stays the one the run trained with",
                               choices=("scale", "keep"))
    checkpoint_every: int = _run_opt(0, "also checkpoint every STEPS steps, or every TIME of training (30s, 10m, "
                                        "2h; with the loader state: exact mid-epoch resume)", type=parse_every,
                                     metavar="STEPS|TIME")
    keep_checkpoints: int = _run_opt(3, "keep the last K checkpoints (and the best by top-1); 0 keeps all",
                                     type=int, metavar="K")
    max_nonfinite_steps: int = _run_opt(50, "stop when the loss stays NaN/inf for K consecutive steps", type=int,
                                        metavar="K")
    hang_timeout: float = _run_opt(600.0, "end the job when a rank makes no progress for this long, naming the "
                                          "stalled rank and what it was doing (0: off)", type=float,
                                   metavar="SECONDS")
    profile_steps: tuple[int, int] | None = None  # --profile-steps A:B (rn50.config.profile_flags)
    profiler: str = PROFILERS[0]  # --profiler

    @classmethod
    def from_flags(cls, values: dict) -> "RunSettings":
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def add_run_flags(parser: argparse.ArgumentParser, counted: str) -> None:
    """rn50.train's run flags, one per RunSettings field, and the profiling flags (`counted`: what their
    steps count)."""
    for f in fields(RunSettings):
        if "flag" in f.metadata:
            parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"],
                                **f.metadata["flag"])
    add_profiling_flags(parser, counted)


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


# --- the command line -------------------------------------------------------------------------------

def _flag_type(kind):
    if typing.get_origin(kind) is tuple:
        return numbers
    return kind


def numbers(text: str) -> tuple[float, ...]:
    """A flag's comma-separated numbers (`--crop-area 0.08,1`)."""
    return tuple(float(v) for v in text.split(",") if v.strip())


def add_recipe_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One flag per field, defaulting to None so that only flags the user gave override a preset.
    `only`: just these fields' flags (flat names; "preset" for --preset), for commands that need a few."""
    for title, table in (("recipe (defaults: the 90-epoch recipe)", RECIPE_FIELDS),
                         ("machine settings (not part of the recipe; free to change on resume)", MACHINE_FIELDS)):
        group = parser.add_argument_group(title)
        if table is RECIPE_FIELDS and (only is None or "preset" in only):
            group.add_argument("--preset", default=None, metavar="NAME[,NAME...]",
                               help=f"recipe presets, applied left to right: {', '.join(available_presets())} "
                                    "or paths to .toml files")
        for f in table.values():
            if only is not None and f.flat not in only:
                continue
            flag = "--" + f.flat.replace("_", "-")
            text = f"{f.help} (default {f.default})".strip().replace("%", "%%")
            if f.kind is bool:
                group.add_argument(flag, dest=f.flat, action=argparse.BooleanOptionalAction, default=None, help=text)
            else:
                metavar = "A,B,..." if typing.get_origin(f.kind) is tuple else f.kind.__name__.upper()
                group.add_argument(flag, dest=f.flat, type=_flag_type(f.kind), default=None, metavar=metavar,
                                   help=text)


# Flags of torchvision's reference script (references/classification/train.py), which people bring along
PEER_FLAGS = {
    "--lr": "use --base-lr: ours is the LR per 256 images, scaled by the global batch (torchvision's --lr is "
            "the LR of the whole global batch)",
    "-b": "use --batch-size (per GPU, as torchvision's -b)",
    "--wd": "use --weight-decay (never applied to BN parameters and biases here)",
    "-j": "use --workers (torchvision loader) or --dali-threads (DALI loaders)",
    "--lr-warmup-epochs": "use --warmup-epochs (a linear warmup from 0, updated every step)",
    "--print-freq": "use --log-every (steps between logged losses)",
    "--test-only": "for a validation-only run use `python -m rn50.evaluate --data DIR --weights PATH --out DIR` "
                   "(our checkpoints or torchvision weights)",
    "--lr-scheduler": "use --schedule step|cosine|plateau",
}


def parse_strict(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_args, but an unknown flag is a UserError naming the closest known flag, or, for a flag of
    torchvision's reference script, ours and how it differs. Every other mistake argparse finds (a value
    of the wrong type, a missing required flag) is a UserError too: one line, exit 2, no usage dump."""
    parser.error = _raise_usage_error
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [o for a in parser._actions for o in a.option_strings]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        name = bad.split("=")[0]
        if PEER_FLAGS.get(name):
            raise UserError(f"{name} is a flag of torchvision's reference script; {PEER_FLAGS[name]}")
        raise UserError(f"unknown argument {bad!r}{_suggest(name, flags)}")
    return args


# Names users come with (other scripts, papers, habit) -> our flag and what to know about it. Keys are
# spelled as _plain spells them: lower case, letters and digits only.
USER_NAMES = {
    **dict.fromkeys(("learningrate", "lr", "lrate", "initiallr", "initlr", "maxlr", "peaklr", "baselearningrate"),
                    ("--base-lr", "the LR per --base-batch images (256 by default), scaled by the global batch")),
    **dict.fromkeys(("wd", "decay", "l2", "weightdecayrate"),
                    ("--weight-decay", "never applied to BN parameters and biases")),
    **dict.fromkeys(("bs", "batch", "batchsz", "minibatch", "minibatchsize", "trainbatchsize", "pergpubatchsize",
                     "perdevicebatchsize", "perdevicetrainbatchsize"), ("--batch-size", "images per GPU, per process")),
    **dict.fromkeys(("numworkers", "nworkers", "worker", "dataloaderworkers", "jobs", "numthreads", "threads",
                     "nthreads"), ("--workers", "torchvision loaders; the DALI loaders take --dali-threads")),
    **dict.fromkeys(("epoch", "numepochs", "nepochs", "maxepochs", "trainepochs", "numtrainepochs"),
                    ("--epochs", "")),
    **dict.fromkeys(("warmup", "lrwarmup", "warmupepoch"), ("--warmup-epochs", "a linear warmup from 0")),
    **dict.fromkeys(("model", "network", "net", "architecture", "backbone"), ("--arch", "resnet18 ... resnet152")),
    **dict.fromkeys(("imgsize", "imsize", "resolution", "res", "size", "inputsize", "cropsize", "trainsize",
                     "trainresolution"), ("--image-size", "")),
    **dict.fromkeys(("datadir", "datapath", "dataset", "datasetdir", "root", "dataroot", "imagenet"),
                    ("--data", "the folder with train/ and val/")),
    **dict.fromkeys(("output", "outdir", "outputdir", "logdir", "savedir", "checkpointdir", "rundir"),
                    ("--out", "the run folder")),
    **dict.fromkeys(("mom", "sgdmomentum"), ("--momentum", "")),
    **dict.fromkeys(("smoothing", "ls"), ("--label-smoothing", "")),
    **dict.fromkeys(("fp16", "halfprecision", "mixedprecision", "autocast"),
                    ("--amp", "on by default; --amp-dtype float16|bfloat16")),
}


def _plain(flag: str) -> str:
    return re.sub(r"[^a-z0-9]", "", flag.lower())


def _suggest(name: str, flags) -> str:
    """The hint after an unknown flag: ours for a name users come with (USER_NAMES), else the closest
    spelling among the parser's flags, compared without dashes and underscores."""
    ours, note = USER_NAMES.get(_plain(name), (None, ""))
    if ours in flags:
        return f"; did you mean {ours!r}?" + (f" ({note})" if note else "")
    if "--preset" in flags and name.lstrip("-") in available_presets():
        return f"; did you mean '--preset {name.lstrip('-')}'?"
    by_plain = {_plain(f): f for f in flags if f.startswith("--")}
    match = difflib.get_close_matches(_plain(name), list(by_plain), n=1, cutoff=0.6)
    return f"; did you mean {by_plain[match[0]]!r}?" if match else _closest(name, flags)


def _raise_usage_error(message: str):
    wrong_type = re.fullmatch(r"argument (\S+?)(?:/\S+)?: invalid (\w+) value: (.*)", message)
    if wrong_type:
        flag, kind, value = wrong_type.groups()
        kind = {"int": "a whole number", "float": "a number",
                "numbers": "comma-separated numbers (e.g. 0.08,1)"}.get(kind, f"a value of type {kind}")
        raise UserError(f"{flag} takes {kind}, got {value}")
    raise UserError(message.removeprefix("argument "))


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
        lines.append(f"warning: the warm-up ({s.warmup_epochs:g} epoch{'s' if s.warmup_epochs != 1 else ''}) outlasts this run's "
                     f"{epochs}: the LR "
                     f"rises to about {min(1.0, s.epochs / s.warmup_epochs):.0%} of its peak and never decays; "
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


def main(argv=None) -> None:
    """`python -m rn50.config.recipe [--preset NAME[,NAME]] [--field value ...]`: print the resolved recipe."""
    import sys

    parser = argparse.ArgumentParser(prog="rn50.config.recipe", description=main.__doc__, allow_abbrev=False)
    add_recipe_flags(parser)
    try:
        resolved = resolve(parse_strict(parser, argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for note in resolved.overridden:
        print(f"# {note}")
    print(format_recipe(resolved.recipe, resolved.machine))


if __name__ == "__main__":
    main()
