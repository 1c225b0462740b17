"""Every input pipeline behind one interface (docs/design.md, The loader interface).

`build_loader(kind, split, data_dir, ...)` returns an iterable of (images, labels): images [N, 3, H, W] in
channels_last on `device`, in `dtype` (float32 unless asked: callers pass `rn50.precision.batch_dtype`, the
dtype their training step computes in), labels int64 [N].
It has len() = steps per epoch for this rank (equal on every rank), `num_samples`, `num_classes`, `decode` (the
decode path in words, for reports), `set_epoch(e)`, `state_dict()` and `load_state_dict()`.
"""

from __future__ import annotations

from dataclasses import fields, replace

from pipelines.augmentation import Augmentation
from pipelines.errors import UserError
from pipelines.folder import check_files, list_split

KINDS = ("dali", "dali-hybrid", "dali-cpu", "torchvision-gpu", "torchvision", "synthetic")
# Kinds that need CUDA, with what they do on the GPU (for the error without one)
CUDA_ONLY = {"dali": "decodes on the GPU", "dali-hybrid": "resizes, jitters and normalises on the GPU"}
# Kinds whose augmentations run in DALI: RandAugment and repeated augmentation are theirs alone
DALI_KINDS = ("dali", "dali-hybrid", "dali-cpu")


def check_device(kind: str, device) -> None:
    """The loader kind can run on this device: `dali` and `dali-hybrid` need CUDA."""
    import torch

    if kind in CUDA_ONLY and (torch.device(device).type != "cuda" or not torch.cuda.is_available()):
        raise UserError(f"the {kind} loader {CUDA_ONLY[kind]} but CUDA is not available to this run; "
                        "pass --loader dali-cpu (DALI's CPU operators) or torchvision-gpu (runs on the CPU) here")
    if kind in CUDA_ONLY:
        from pipelines.dali_wheel import check_matches_torch

        check_matches_torch()  # a DALI wheel for another CUDA major fails inside its GPU operators


AUTO_WORKERS = -1  # --workers' default: default_workers()
MAX_AUTO_WORKERS = 8


def default_workers() -> int:
    """Worker processes (torchvision) or reading threads (torchvision-gpu) per rank when --workers is not
    given: the cores this process may run on (os.sched_getaffinity) shared by the ranks on this node
    (LOCAL_WORLD_SIZE, set by torchrun), at least 1 and at most 8. On a 2-core machine: 2 for one process."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(MAX_AUTO_WORKERS, cores // local_ranks))


def build_loader(kind: str, split: str, data_dir, *, batch_size: int, image_size: int, rank: int = 0,
                 world_size: int = 1, local_rank: int = 0, seed: int = 0, device="cpu", dtype=None,
                 manifest=None, preflight: bool | str = True, augmentation: Augmentation | None = None,
                 **options):
    """manifest: a `tools.scan` output folder whose <split>.txt lists the files to use (already checked);
    preflight: without a manifest, check every file's header before the first batch; "split": check them,
    and count and name only this split's bad files (rn50.evaluate, which reads no other split).
    augmentation: the spec (pipelines.augmentation); single fields of it may also come as options
    (color_jitter=0.0), and image_size always sets its image_size.
    options: dali_threads, hw_decoder_load, fused_decode, prefetch (DALI); workers (torchvision: worker
    processes; torchvision-gpu: reading threads; AUTO_WORKERS or absent: default_workers()), prefetch
    (torchvision-gpu: batches prepared ahead);
    num_classes, num_samples (synthetic). Options a loader does not take are ignored."""
    import torch  # here, not at import time: tools that only need UserError stay light

    if kind not in KINDS:
        raise UserError(f"unknown loader {kind!r}; choose one of {', '.join(KINDS)}")
    device = torch.device(device)
    check_device(kind, device)
    spec_fields = {f.name for f in fields(Augmentation)}
    aug = replace(augmentation or Augmentation(), image_size=image_size,
                  **{k: options.pop(k) for k in list(options) if k in spec_fields}).validate()
    if kind not in (*DALI_KINDS, "synthetic") and split == "train" \
            and (aug.randaugment_magnitude > 0 or aug.repeated_aug > 1):
        raise UserError("RandAugment and repeated augmentation run inside the DALI pipelines; use --loader dali, "
                        "dali-hybrid or dali-cpu with them, or drop --randaugment-magnitude/--repeated-aug")
    dtype = dtype or torch.float32  # the model's own dtype: right whenever autocast is off
    if options.get("workers", AUTO_WORKERS) == AUTO_WORKERS:
        options["workers"] = default_workers()
    from pipelines.shards import build_shard_loader, is_shards, list_shard_split

    shards = is_shards(data_dir)  # a tools.shard folder or s3://bucket/prefix (pipelines/shards.py)
    if shards and manifest is not None:
        raise UserError("--manifest lists files of class folders; with shards, shard from it instead "
                        "(`python -m tools.shard SRC --manifest SCAN --out DST`) and drop --manifest")
    image_list = list_shard_split(str(data_dir), split) if shards else \
        list_split(str(data_dir), split, None if manifest is None else str(manifest)) if data_dir is not None else None
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
        if manifest is None and preflight and kind != "synthetic" and not shards:  # tools.shard checked them
            check_files(image_list, rank, world_size, kind, every_split=preflight != "split")
    common = dict(batch_size=batch_size, aug=aug, rank=rank, world_size=world_size,
                  seed=seed, device=device, dtype=dtype, image_list=image_list)
    if shards and kind != "synthetic":
        return build_shard_loader(kind, split, common, local_rank=local_rank, options=options)
    if kind in DALI_KINDS:
        from pipelines.dali import PLACEMENTS, DaliLoader

        dali = {"threads": options.get("dali_threads", 4), "prefetch": options.get("prefetch", 2),
                "hw_decoder_load": options.get("hw_decoder_load", 0.65),
                "fused_decode": options.get("fused_decode", True)}
        return DaliLoader(split, **common, local_rank=local_rank, placement=PLACEMENTS[kind], **dali)
    if kind == "torchvision":
        from pipelines.baseline import TorchvisionLoader

        return TorchvisionLoader(split, **common, workers=options["workers"])
    if kind == "torchvision-gpu":
        from pipelines.torchvision_gpu import TorchvisionGpuLoader

        return TorchvisionGpuLoader(split, **common, threads=options["workers"],
                                    prefetch=options.get("prefetch", 2))
    from pipelines.synthetic import SyntheticLoader

    return SyntheticLoader(split, **common, **options)
