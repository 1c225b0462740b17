"""The loader kinds: one record each, the one table that the recipe (--loader's choices and help), the
harness (its default loader sets, the DALI settings sweep), the errors (CUDA, RandAugment, shards, the
pre-flight check) and the docs (docs/loaders.md's table, checked by a test) all read.

Light on purpose: no torch, no DALI at import time (rn50.config.recipe reads it before the flags are parsed);
each factory imports its loader when it is called.

docs/loaders.md's table is `markdown_table()` (tests/unit/test_loader_boundary.py keeps it current):
    python -c "from pipelines.registry import markdown_table; print(markdown_table())"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from pipelines.augmentation import Augmentation
    from pipelines.loader import Loader
    from pipelines.settings import LoaderSettings


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
    factory: Callable[[Request], "Loader"]  # the loader over class folders (or, for synthetic, anything)
    shard_factory: Callable[[Request], "Loader"] | None = None  # the loader over shards; None: reads none
    needs_cuda: str | None = None  # what it does on the GPU, for the error without CUDA; None: runs on the CPU
    decodes_by_content: bool = False  # reads CMYK JPEGs and PNG/BMP/TIFF/WebP behind a .JPEG name (pre-flight)
    dali: bool = False  # a DALI pipeline: RandAugment and repeated augmentation run in it (theirs alone)
    reads_images: bool = True  # False: synthetic batches (the harness's ceiling, not a loader it compares)
    tag: str = ""  # a few words after the name in --loader's help

    @property
    def reads_shards(self) -> bool:
        return self.shard_factory is not None


# --------------------------------------------------------------------------------------- the factories


def _dali(placement: str, shards: bool) -> Callable[[Request], "Loader"]:
    def build(r: Request) -> "Loader":
        if shards:
            from pipelines.dali_shards import ShardDaliLoader as loader_class
        else:
            from pipelines.dali import DaliLoader as loader_class
        s = r.settings
        return loader_class(r.split, **r.common(), local_rank=r.local_rank, placement=placement,
                            threads=s.dali_threads, prefetch=s.prefetch, hw_decoder_load=s.hw_decoder_load,
                            fused_decode=s.fused_decode)

    return build


def _torchvision(r: Request) -> "Loader":  # class folders and shards alike: only the dataset differs
    from pipelines.baseline import TorchvisionLoader

    return TorchvisionLoader(r.split, **r.common(), workers=r.settings.workers)


def _torchvision_gpu(r: Request) -> "Loader":
    from pipelines.torchvision_gpu import TorchvisionGpuLoader

    return TorchvisionGpuLoader(r.split, **r.common(), threads=r.settings.workers, prefetch=r.settings.prefetch)


def _synthetic(r: Request) -> "Loader":
    from pipelines.synthetic import SyntheticLoader

    return SyntheticLoader(r.split, **r.common(), num_classes=r.num_classes, num_samples=r.num_samples)


# ------------------------------------------------------------------------------------------ the kinds

_KINDS = (
    LoaderKind("dali", "nvJPEG on the GPU (the A100/H100/H200 hardware decoder takes `hw_decoder_load` of the "
                       "images), fused with the random crop: only the crop's region is decoded; resize, jitter, "
                       "flip and normalise on the GPU",
               _dali("gpu", False), _dali("gpu", True), needs_cuda="decodes on the GPU", dali=True, tag="GPU"),
    LoaderKind("dali-hybrid", "libjpeg-turbo on `dali_threads` CPU threads, fused with the random crop; resize, "
                              "jitter, flip and normalise on the GPU",
               _dali("hybrid", False), _dali("hybrid", True),
               needs_cuda="resizes, jitters and normalises on the GPU", decodes_by_content=True, dali=True,
               tag="CPU decode, GPU augment"),
    LoaderKind("dali-cpu", "libjpeg-turbo on `dali_threads` CPU threads, fused with the random crop, and every "
                           "other operator on the CPU too, then one copy to the device",
               _dali("cpu", False), _dali("cpu", True), decodes_by_content=True, dali=True),
    LoaderKind("torchvision-gpu", "torchvision alone: files read by `workers` threads, one batched decode_jpeg "
                                  "on the device (nvJPEG; the CPU without CUDA), crops, flips, jitter and "
                                  "normalisation as batched tensor ops",
               _torchvision_gpu, _torchvision_gpu, tag="torchvision's batched decoder"),
    LoaderKind("torchvision", "PIL and torchvision transforms in `workers` DataLoader processes, then one copy to "
                              "the device",
               _torchvision, _torchvision, decodes_by_content=True),
    LoaderKind("synthetic", "one device-resident batch served every step: the GPU ceiling and the fastest test "
                            "double",
               _synthetic, _synthetic, reads_images=False),
)

REGISTRY: dict[str, LoaderKind] = {kind.name: kind for kind in _KINDS}
KINDS: tuple[str, ...] = tuple(REGISTRY)


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
    lines = ["| loader | what it does | needs CUDA | decodes by content | RandAugment, repeated aug | reads shards |",
             "|---|---|---|---|---|---|"]
    lines += [f"| `{k.name}` | {k.description} | {'yes: ' + k.needs_cuda if k.needs_cuda else 'no'} | "
              f"{yes(k.decodes_by_content) if k.reads_images else 'n/a'} | "
              f"{yes(k.dali) if k.reads_images else 'n/a'} | {yes(k.reads_shards)} |" for k in _KINDS]
    return "\n".join(lines)
