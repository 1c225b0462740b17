"""The loader kinds: one record each, the one table that the recipe (--loader's choices and help, `auto`),
the harness (its default loader sets, the DALI settings sweep, the verdict's advice), the errors (CUDA,
RandAugment, shards, the pre-flight check), a resume (which kinds continue an epoch at a new world size)
and the docs (docs/loaders.md's table, checked by a test) all read. Adding a kind is its module and one
record here.

Light on purpose: no torch, no DALI at import time (rn50.config.recipe reads it before the flags are parsed),
and no loader module at all: a record names its loader classes by path ("pipelines.dali:DaliLoader"),
imported when one is built; the loader modules may import this one.

docs/loaders.md's table is `markdown_table()` (tests/unit/test_loader_boundary.py keeps it current):
    python -c "from pipelines.registry import markdown_table; print(markdown_table())"
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pipelines.augmentation import Augmentation
    from pipelines.loader import Loader
    from pipelines.settings import LoaderSettings

AUTO = "auto"  # --loader auto: the kind whose `auto_on` is this process's device type (concrete_kind)
_AUTO_DEVICES = ("cuda", "cpu")  # auto_on's values; "cpu" stands for every device type but CUDA


@dataclass(frozen=True)
class Request:
    """What build_loader settled for one loader: every value given, none left to a loader's own default."""

    split: str
    image_list: object  # pipelines.folder.ImageList or pipelines.shards.ShardList; None: synthetic without data
    batch_size: int
    aug: "Augmentation"  # validated, with the run's image_size
    rank: int
    world_size: int
    local_rank: int
    seed: int
    device: "torch.device"
    dtype: "torch.dtype"
    settings: "LoaderSettings"  # validated, workers resolved (never AUTO_WORKERS)
    num_classes: int  # synthetic without data
    num_samples: int | None  # synthetic without data; None: one batch per rank

    def common(self) -> dict:
        """The constructor arguments every loader takes."""
        return dict(image_list=self.image_list, batch_size=self.batch_size, aug=self.aug, rank=self.rank,
                    world_size=self.world_size, seed=self.seed, device=self.device, dtype=self.dtype)


@dataclass(frozen=True)
class LoaderKind:
    name: str
    description: str  # one line: what it does (docs/loaders.md's table, --loader's help)
    # "module:Class", imported when built; the class's `from_request(request, kind)` makes the loader
    loader: str  # over class folders (or, for synthetic, anything), and over shards unless shard_loader says
    shard_loader: str | None = None  # over shards, where another class than `loader` reads them
    reads_shards: bool = True  # False: build_loader refuses shards for this kind, naming those that read them
    placement: str | None = None  # a DALI pipeline, its operators' placement ("gpu", "hybrid", "cpu"): pipelines.dali
    needs_cuda: str | None = None  # what it does on the GPU, for the error without CUDA; None: runs on the CPU
    decodes_by_content: bool = False  # reads CMYK JPEGs and PNG/BMP/TIFF/WebP behind a .JPEG name (pre-flight)
    reads_images: bool = True  # False: synthetic batches (the harness's ceiling, not a loader it compares)
    # TrivialAugment-wide per image (DALI's auto_aug, torchvision's TrivialAugmentWide in the worker processes);
    # random erasing runs in every kind that reads images
    trivial_augment: bool = False
    # the epoch order is one global permutation whatever the world size (pipelines.order): a change of world
    # size continues the interrupted epoch (rn50.reliability.lifecycle.resume_point); the others restart it
    elastic: bool = False
    auto_on: str | None = None  # `--loader auto` means this kind on this device type ("cuda"; "cpu": any other)
    # the verdict's next steps when this kind is the bottleneck (benchmarks.verdict), on CUDA and without it;
    # every kind that reads images has them wherever it runs (checked below)
    advice_gpu: tuple[str, ...] = ()
    advice_cpu: tuple[str, ...] = ()
    tag: str = ""  # a few words after the name in --loader's help
    # why the benchmark harness leaves this kind out of its default set on a machine without CUDA (it still runs
    # there when named, e.g. --loaders torchvision-gpu); None: in the default set wherever it runs
    not_a_cpu_default: str | None = None

    def __post_init__(self):
        if self.reads_images and not self.advice_gpu:
            raise ValueError(f"loader kind {self.name}: give it advice_gpu (the verdict's next steps on CUDA)")
        if self.reads_images and not self.needs_cuda and not self.advice_cpu:
            raise ValueError(f"loader kind {self.name} runs without CUDA: give it advice_cpu (the verdict's next "
                             "steps there)")
        if self.auto_on not in (None, *_AUTO_DEVICES):
            raise ValueError(f"loader kind {self.name}: auto_on is one of {_AUTO_DEVICES} or None")

    @property
    def dali(self) -> bool:
        """A DALI pipeline: RandAugment and repeated augmentation run in it (theirs alone)."""
        return self.placement is not None

    def loader_class(self, shards: bool = False) -> type:
        """The class that reads class folders, or shards: imported here, on first use."""
        if shards and not self.reads_shards:
            raise ValueError(f"the {self.name} loader reads no shards")
        path = (self.shard_loader or self.loader) if shards else self.loader
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), name)

    def build(self, request: Request, shards: bool = False) -> "Loader":
        return self.loader_class(shards).from_request(request, self)


# ------------------------------------------------------------------------------------------- the advice

_SMALLER_JPEGS = "reduce JPEG size: pre-resize the dataset so the shorter side is ~256-320 px"
_DALI_THREADS = "add DALI threads (--dali-threads) up to the number of free cores per GPU"
_TV_GPU_DEPTH = "raise --prefetch (batches decoded ahead) and --workers (threads reading the files)"
_TV_WORKERS = "add DataLoader workers (--workers) up to the free cores per GPU"


def _switch_first(on_gpu: str, on_cpu: str, *rest: str) -> dict:
    """The advice of a kind that runs anywhere: first a switch (on CUDA, and elsewhere), then the same steps."""
    return dict(advice_gpu=(on_gpu, *rest), advice_cpu=(on_cpu, *rest))


# ------------------------------------------------------------------------------------------ the kinds

_KINDS = (
    LoaderKind("dali", "nvJPEG on the GPU (the A100/H100/H200 hardware decoder takes `hw_decoder_load` of the "
                       "images), fused with the random crop: only the crop's region is decoded; resize, jitter, "
                       "flip and normalise on the GPU",
               "pipelines.dali:DaliLoader", "pipelines.dali_shards:ShardDaliLoader", placement="gpu",
               trivial_augment=True,
               needs_cuda="decodes on the GPU", auto_on="cuda", tag="GPU",
               advice_gpu=("raise --hw-decoder-load (A100/H100/H200 hardware JPEG decoder; 0.65-0.9 measured best "
                           "on H100)",
                           "add DALI CPU threads (--dali-threads) and deepen the prefetch queue (--prefetch)",
                           "run `python -m benchmarks.run --autotune` to sweep threads, hw_decoder_load and prefetch",
                           _SMALLER_JPEGS)),
    LoaderKind("dali-hybrid", "libjpeg-turbo on `dali_threads` CPU threads, fused with the random crop; resize, "
                              "jitter, flip and normalise on the GPU",
               "pipelines.dali:DaliLoader", "pipelines.dali_shards:ShardDaliLoader", placement="hybrid",
               trivial_augment=True,
               needs_cuda="resizes, jitters and normalises on the GPU", decodes_by_content=True,
               tag="CPU decode, GPU augment",
               advice_gpu=("switch to the GPU decoder (--loader dali) where the GPU has a hardware JPEG decoder "
                           "(A100/H100/H200)",
                           "add DALI threads (--dali-threads) up to the free cores per GPU: decoding and cropping "
                           "run on them",
                           _SMALLER_JPEGS)),
    LoaderKind("dali-cpu", "libjpeg-turbo on `dali_threads` CPU threads, fused with the random crop; resize, flip, "
                           "jitter and normalise by torch inside the pipeline, then one copy to the device",
               "pipelines.dali:DaliLoader", "pipelines.dali_shards:ShardDaliLoader", placement="cpu",
               trivial_augment=True,
               decodes_by_content=True, auto_on="cpu",
               advice_gpu=("switch to the GPU pipeline (--loader dali): nvJPEG and the hardware decoder take "
                           "decoding off the CPU", _DALI_THREADS, _SMALLER_JPEGS),
               # without CUDA there is no GPU pipeline to switch to: never advise `--loader dali` there
               advice_cpu=(_DALI_THREADS, _SMALLER_JPEGS)),
    LoaderKind("torchvision-gpu", "torchvision alone: files read by `workers` threads, one batched decode_jpeg "
                                  "(TorchCodec's, else torchvision's) on the device (nvJPEG; the CPU without CUDA), "
                                  "crops, flips, jitter and normalisation as batched tensor ops",
               "pipelines.torchvision_gpu:TorchvisionGpuLoader", elastic=True, tag="torchvision's batched decoder",
               not_a_cpu_default="a GPU loader: on the CPU its batched crops (padded into one dense batch and resampled "
                                 "by dense matrix products) run at 1/6 of the other loaders' speed (issue 39)",
               **_switch_first("switch to DALI (--loader dali): its decode is fused with the crop and shares the "
                               "hardware decoder",
                               "switch to DALI's CPU pipeline (--loader dali-cpu): its threads decode and crop in "
                               "one pass", _TV_GPU_DEPTH, _SMALLER_JPEGS)),
    LoaderKind("torchvision", "libjpeg-turbo (TorchCodec, else torchvision.io; PIL for other formats) and "
                              "torchvision transforms in `workers` DataLoader processes, which normalise to the "
                              "training dtype, channels_last; then one copy to the device",
               "pipelines.torchvision_loader:TorchvisionLoader", decodes_by_content=True, elastic=True,
               trivial_augment=True,
               **_switch_first("switch to DALI (--loader dali on GPU, dali-cpu otherwise): threads scale better "
                               "than worker processes",
                               "switch to DALI's CPU pipeline (--loader dali-cpu): threads scale better than worker "
                               "processes", _TV_WORKERS, _SMALLER_JPEGS)),
    LoaderKind("synthetic", "one device-resident batch served every step: the GPU ceiling and the fastest test "
                            "double",
               "pipelines.synthetic:SyntheticLoader", reads_images=False, elastic=True),
)

REGISTRY: dict[str, LoaderKind] = {kind.name: kind for kind in _KINDS}
KINDS: tuple[str, ...] = tuple(REGISTRY)
_AUTO = {device: next(k.name for k in _KINDS if k.auto_on == device) for device in _AUTO_DEVICES}  # one each


def concrete_kind(kind: str, device_type: str) -> str:
    """`auto` as the kind it means on a device of this type (torch.device.type): the record whose `auto_on`
    is "cuda" on CUDA (dali), "cpu" on any other device (dali-cpu); any other kind as it is."""
    if kind != AUTO:
        return kind
    return _AUTO["cuda" if device_type == "cuda" else "cpu"]


def kinds(**wanted) -> tuple[str, ...]:
    """The kinds whose fields have the given truth values, in the registry's order:
    kinds(dali=True), kinds(reads_images=True, needs_cuda=False)."""
    return tuple(name for name, kind in REGISTRY.items()
                 if all(bool(getattr(kind, field)) == value for field, value in wanted.items()))


def choices_help() -> str:
    """The kinds for --loader's help: "dali (GPU) | dali-hybrid (CPU decode, GPU augment) | dali-cpu | ..."."""
    return " | ".join(f"{k.name} ({k.tag})" if k.tag else k.name for k in _KINDS)


def or_list(names) -> str:
    """"a, b or c"."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def markdown_table() -> str:
    """docs/loaders.md's table of the loader kinds, as the registry has them."""
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    lines = ["| loader | what it does | needs CUDA | decodes by content | RandAugment, repeated aug | TrivialAugment "
             "| reads shards | elastic |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| `{k.name}` | {k.description} | {'yes: ' + k.needs_cuda if k.needs_cuda else 'no'} | "
              f"{yes(k.decodes_by_content) if k.reads_images else 'n/a'} | "
              f"{yes(k.dali) if k.reads_images else 'n/a'} | {yes(k.trivial_augment) if k.reads_images else 'n/a'} | "
              f"{yes(k.reads_shards)} | {yes(k.elastic)} |"
              for k in _KINDS]
    return "\n".join(lines)
