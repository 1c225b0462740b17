"""Every input pipeline behind one interface (docs/design.md, The loader interface).

`build_loader(kind, split, data_dir, ...)` returns a `Loader` (pipelines.loader): an iterable of (images,
labels), images [N, 3, H, W] in channels_last on `device`, in `dtype` (float32 unless asked: callers pass
`rn50.core.precision.batch_dtype`, the dtype their training step computes in), labels int64 [N]; with len() = steps
per epoch for this rank (equal on every rank), `num_samples`, `num_classes`, `class_counts`, `image_size`,
`decode` (the decode path in words, for reports), `set_epoch(e)`, `state_dict()` and `load_state_dict()`.

The kinds, and what each needs and does, are the records of pipelines.registry; how a machine runs them is
a `LoaderSettings` (pipelines.settings), the one home of those settings' defaults. `list_data(data, split,
manifest)` (pipelines.listing) is the one listing of --data, class folders or shards, that build_loader reads;
its `.identity` is what checkpoints record of the training list.
"""

from __future__ import annotations

from dataclasses import fields, replace

from pipelines.augmentation import Augmentation
from pipelines.errors import UserError
from pipelines.folder import check_files
from pipelines.listing import Listing, list_data
from pipelines.loader import Loader
from pipelines.registry import KINDS, REGISTRY, Request, kinds, or_list
from pipelines.settings import LoaderSettings

__all__ = ["KINDS", "REGISTRY", "Listing", "Loader", "LoaderSettings", "UserError", "build_loader", "check_device",
           "list_data"]


def check_device(kind: str, device) -> None:
    """The loader kind can run on this device: the kinds whose record says `needs_cuda` need CUDA."""
    import torch

    needs = REGISTRY[kind].needs_cuda if kind in REGISTRY else None
    if needs and (torch.device(device).type != "cuda" or not torch.cuda.is_available()):
        raise UserError(f"the {kind} loader {needs} but CUDA is not available to this run; "
                        "pass --loader dali-cpu (DALI's CPU operators) or torchvision-gpu (runs on the CPU) here")
    if needs and REGISTRY[kind].dali:
        from pipelines.dali_wheel import check_matches_torch

        check_matches_torch()  # a DALI wheel for another CUDA major fails inside its GPU operators


_SETTINGS_FIELDS = tuple(f.name for f in fields(LoaderSettings))
_SPEC_FIELDS = tuple(f.name for f in fields(Augmentation))


def _split_fields(given: dict) -> tuple[dict, dict]:
    """build_loader's loose keywords as (LoaderSettings fields, Augmentation fields); anything else is refused."""
    unknown = [name for name in given if name not in _SETTINGS_FIELDS and name not in _SPEC_FIELDS]
    if unknown:
        raise UserError(
            f"build_loader does not take {', '.join(sorted(unknown))}; it takes batch_size, image_size, rank, "
            "world_size, local_rank, seed, device, dtype, manifest, preflight, augmentation (an Augmentation), "
            "settings (a LoaderSettings), num_classes and num_samples (synthetic), and single fields of the "
            f"settings ({', '.join(_SETTINGS_FIELDS)}) or of the augmentation spec (e.g. color_jitter)")
    return ({k: v for k, v in given.items() if k in _SETTINGS_FIELDS},
            {k: v for k, v in given.items() if k in _SPEC_FIELDS})


def build_loader(kind: str, split: str, data_dir, *, batch_size: int, image_size: int, rank: int = 0,
                 world_size: int = 1, local_rank: int = 0, seed: int = 0, device="cpu", dtype=None,
                 manifest=None, preflight: bool | str = True, augmentation: Augmentation | None = None,
                 settings: LoaderSettings | None = None, num_classes: int = 1000, num_samples: int | None = None,
                 **single_fields) -> Loader:
    """manifest: a `tools.scan` output folder whose <split>.txt lists the files to use (already checked);
    preflight: without a manifest, check every file's header before the first batch; "split": check them,
    and count and name only this split's bad files (rn50.evaluate, which reads no other split).
    augmentation: the spec (pipelines.augmentation); image_size always sets its image_size.
    settings: how this machine runs the loader (pipelines.settings.LoaderSettings; its defaults when not given).
    num_classes, num_samples: the synthetic loader's size without a data folder (with one, it mimics the folder).
    single_fields: single fields of the settings (workers=0) or of the augmentation spec (color_jitter=0.0),
    replacing those of `settings` and `augmentation`; any other name is a UserError naming it."""
    setting_fields, spec_fields = _split_fields(single_fields)
    import torch  # here, not at import time: tools that only need UserError stay light

    if kind not in REGISTRY:
        raise UserError(f"unknown loader {kind!r}; choose one of {', '.join(KINDS)}")
    record = REGISTRY[kind]
    device = torch.device(device)
    check_device(kind, device)
    aug = replace(augmentation or Augmentation(), image_size=image_size, **spec_fields).validate()
    if record.reads_images and not record.dali and split == "train" \
            and (aug.randaugment_magnitude > 0 or aug.repeated_aug > 1):
        raise UserError(f"RandAugment and repeated augmentation run inside the DALI pipelines; use --loader "
                        f"{or_list(kinds(dali=True))} with them, or drop --randaugment-magnitude/--repeated-aug")
    if record.reads_images and not record.trivial_augment and split == "train" and aug.trivial_augment:
        raise UserError(f"TrivialAugment runs per image in the DALI pipelines and the torchvision loader's workers, "
                        f"not in the {kind} loader's batched ops; use --loader "
                        f"{or_list(kinds(trivial_augment=True))} with --trivial-augment, or drop it")
    settings = replace(settings or LoaderSettings(), **setting_fields).validate()
    settings = replace(settings, workers=settings.resolved_workers())
    dtype = dtype or torch.float32  # the model's own dtype: right whenever autocast is off
    listing = list_data(data_dir, split, manifest)  # class folders, or a tools.shard folder or s3://bucket/prefix
    shards = listing is not None and listing.shards
    image_list = None if listing is None else listing.images
    if image_list is not None:
        shard_size = len(image_list) // world_size
        # the same rule for every loader sized by the data, synthetic included (it mimics the folder's size):
        # a training share smaller than one batch has no batches at all
        if split == "train" and shard_size < batch_size:
            raise UserError(
                f"batch size {batch_size} is larger than this rank's share of {split} "
                f"({len(image_list)} images over {world_size} {'rank' if world_size == 1 else 'ranks'} = "
                f"{shard_size}); lower --batch-size"
            )
        if manifest is None and preflight and record.reads_images and not shards:  # tools.shard checked them
            check_files(image_list, rank, world_size, record.decodes_by_content, every_split=preflight != "split")
    request = Request(split, image_list, batch_size, aug, rank, world_size, local_rank, seed, device, dtype,
                      settings, num_classes, num_samples)
    if not shards:
        return record.build(request)
    if record.reads_images and split == "train" and aug.repeated_aug > 1:
        raise UserError("repeated augmentation (--repeated-aug) reads class folders; train from the folders, or "
                        "drop --repeated-aug when reading shards")
    if not record.reads_shards:
        raise UserError(f"the {kind} loader does not read shards yet; use --loader "
                        f"{or_list(kinds(reads_shards=True, reads_images=True))} with shards, or pass the class "
                        "folders as --data")
    return record.build(request, shards=True)
