"""The machine settings: how this machine runs the recipe (the loader, the device, the speed levers, the
trackers), not what is trained. Saved as machine.json in the run folder, free to change on resume and never
inherited from a checkpoint (rn50.config.recipe.resolve lays them over their defaults with the recipe)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from pipelines.augmentation import opt
from pipelines.registry import AUTO, KINDS, REGISTRY, choices_help, concrete_kind
from pipelines.settings import LoaderSettings
from rn50.config.errors import UserError

DEVICES = ("auto", "cuda", "cpu")  # rn50.system.device.choose_device
COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")  # torch.compile's
TRACKERS = ("none", "wandb", "mlflow")  # rn50.observe.tracking's backends


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
        return dataclasses.replace(self, loader=concrete_kind(self.loader, device_type))

    def validate(self) -> "Machine":
        if self.loader not in KINDS + (AUTO,):
            raise UserError(f"unknown loader {self.loader!r}; choose one of {', '.join((AUTO,) + KINDS)}")
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


def process_cores() -> tuple[int, int]:
    """(the cores this process may run on: its CPU affinity, the ranks on this node: LOCAL_WORLD_SIZE), as
    pipelines.settings.default_workers counts them."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return cores, max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def unusable_requests(machine: Machine, given, cores: int, local_ranks: int = 1) -> str | None:
    """One start-up line naming the machine settings a preset or flag asked for (`given`: their flat names)
    that this process cannot use as asked, or None: more loader threads or processes than its share of the
    cores (they take turns: no faster than that share), a DALI setting its loader does not have, the hardware
    JPEG decoder's share on a loader that decodes on the CPU. `machine`: with its loader made concrete
    (Machine.for_device); `cores` over `local_ranks`: what process_cores gives. A pure function."""
    kind, share = REGISTRY[machine.loader], max(1, cores // max(1, local_ranks))
    where = f"{share} core{'s' if share != 1 else ''}" + (f" ({cores} over {local_ranks} processes on this node)"
                                                          if local_ranks > 1 else "")
    said = []
    if "dali_threads" in given and not kind.dali:
        said.append(f"dali_threads = {machine.dali_threads}: the {machine.loader} loader runs no DALI threads")
    elif "dali_threads" in given and machine.dali_threads > share:
        said.append(f"dali_threads = {machine.dali_threads} on {where}: the threads take turns, so "
                    f"--dali-threads {share} does as much")
    if "workers" in given and machine.loader == "torchvision" and machine.workers > share:
        said.append(f"workers = {machine.workers} processes on {where}: they take turns, so --workers {share} "
                    "does as much")
    if "hw_decoder_load" in given and kind.placement != "gpu":
        said.append(f"hw_decoder_load = {machine.hw_decoder_load:g}: the {machine.loader} loader decodes on the "
                    "CPU, without the hardware JPEG decoder")
    return "note: asked for, not usable as asked here: " + "; ".join(said) if said else None
