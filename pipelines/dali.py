"""DALI input pipelines: one definition per split, a `device` switch between GPU and CPU operators.

GPU ("dali"):            readers.file -> nvJPEG decode fused with RandomResizedCrop (mixed, HW decoder) ->
                         resize -> colour jitter -> flip + normalise -> fp16 NHWC on the GPU, never through
                         the host.
Hybrid ("dali-hybrid"):  decode fused with the crop on DALI's CPU threads (libjpeg-turbo), then the rest on
                         the GPU: for GPUs without a hardware JPEG decoder and machines with spare cores.
CPU ("dali-cpu"):        every operator on the CPU (tests, CI, machines without CUDA).

`placement` names the split: "gpu", "hybrid" or "cpu" (each kind's record in pipelines.registry gives it).
Every setting comes from the loader's LoaderSettings (pipelines.settings); nothing here has a default of its own.

The NHWC batch reaches torch as `permute(0, 3, 1, 2)`: an NCHW tensor in channels_last, no copy.
"""

from __future__ import annotations

import gc
import math
import os
import re
import warnings
from dataclasses import replace

import numpy as np
import torch

from pipelines import dali_host
from pipelines.augmentation import MEAN, RANDAUGMENT_MAX, STD, Augmentation
from pipelines.decode_probe import probe_fused_decode, probe_images
from pipelines.erasing import dali_erase
from pipelines.errors import UserError
from pipelines.loader import DaliCheckpoint
from pipelines.profiler_ranges import named_range
from pipelines.settings import keep_freed_memory

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.auto_aug import rand_augment, trivial_augment
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError:  # reported when a DALI loader is asked for, so other loaders work without DALI
    fn = None

# A forked child (a torchvision DataLoader worker, a harness row after a DALI one) that frees a DALI pipeline
# left in the parent as cyclic garbage (a traceback's frames, say) waits forever in its destructor for DALI
# threads that do not exist in the child. Collecting in the parent before every fork leaves it nothing to free.
os.register_at_fork(before=gc.collect)

# nvJPEG scratch buffers sized for ImageNet, as in NVIDIA's reference pipeline: no re-allocation mid-run
_DEVICE_PADDING = 211_025_920
_HOST_PADDING = 140_544_512
_READER = "Reader"


def require_dali() -> None:
    """DALI is importable, or one line saying which wheel to install (every DALI loader asks first)."""
    if fn is None:
        from pipelines.dali_wheel import requirement

        raise UserError(f"NVIDIA DALI is not installed; install the wheel for this torch with "
                        f"`pip install '{requirement(torch.version.cuda)}'`, or choose --loader torchvision")


def _decoder_args(placement: str, hw_decoder_load: float) -> dict:
    if placement != "gpu":
        return {"device": "cpu"}  # libjpeg-turbo: fancy (interpolated) chroma upsampling, as PIL
    return {
        "device": "mixed",
        "hw_decoder_load": hw_decoder_load,
        # Chroma upsampled by interpolation, as libjpeg-turbo (so PIL, torchvision and our CPU pipeline) do.
        # nvJPEG's default repeats chroma samples instead: 0.032 mean absolute difference on 4:2:0 JPEGs,
        # six times our validation goal of 0.005 against torchvision. Training uses it too, so the model
        # sees the same colours at training and test time and on the GPU and CPU pipelines; the hardware
        # decoder supports the flag (nvJPEG >= 12.1). Its cost is for the GPU benchmark to show.
        "jpeg_fancy_upsampling": True,
        "device_memory_padding": _DEVICE_PADDING,
        "host_memory_padding": _HOST_PADDING,
    }


def _normalize(images, dtype, mirror=None, normalize=MEAN + STD):
    """Mean/std (the augmentation's `normalize`, on 0-1 pixels; ImageNet's by default), HWC kept (channels_last
    for torch), optional horizontal flip."""
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if dtype == torch.float16 else types.FLOAT,
        output_layout="HWC",
        mean=[m * 255 for m in normalize[:3]],  # DALI normalises uint8 pixels
        std=[s * 255 for s in normalize[3:]],
        mirror=mirror if mirror is not None else 0,
    )


def _normalize_on_host(images, dtype, normalize, jitter_factors=(), size=0, mirror=None):
    """_normalize's work on the CPU pipeline's uint8 HWC images, by torch (pipelines.dali_host: 6x cheaper); before
    it, where given, the resize to `size` with the flip, and the colour jitter with its per-sample factors."""
    steps = dali_host.HostSteps(size=size, normalize=normalize, dtype=dtype)
    flips = [mirror] if size else []
    return fn.python_function(images, *flips, *jitter_factors, function=steps, batch_processing=True,
                              output_layouts="HWC")


def _reader(files, labels, shard_id, num_shards, training):
    if hasattr(files, "reader"):  # shards: tar members from pipelines.dali_shards, in its own exact order
        return files.reader()
    # Training: `shuffle_after_epoch` is a real global reshuffle every epoch, identical on every shard
    # (so the shards partition the data). `random_shuffle` would only shuffle within a buffer.
    # Validation: in order, padded so the iterator can drop the padding and count every image once.
    return fn.readers.file(
        files=list(files),
        labels=list(labels),
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle_after_epoch=training,
        pad_last_batch=not training,
        name=_READER,
        # read(), not mmap: each file's munmap flushed the TLB of every core the process ran on (DALI's reader
        # maps, copies and unmaps one file per sample); 3% of dali-cpu's CPU time per image (docs/loaders.md)
        dont_use_mmap=True,
    )


def _labels(labels, placement):
    return labels if placement == "cpu" else labels.gpu()


def _after_decode(images, placement):
    """Hybrid: the decoded (and cropped) images go to the GPU for everything after decoding."""
    return images.gpu() if placement == "hybrid" else images


# DALI's own auto_aug (RandAugment, TrivialAugment) still calls fn.experimental.filter and
# fn.experimental.equalize, which DALI itself deprecates: one DeprecationWarning per call, 4 per RandAugment
# graph (20 with magnitude_std), about 70 lines of output that no user of ours can act on. DALI raises them
# under its own `simplefilter("default")`, which overrides any filter of ours, so they are dropped where shown,
# these messages only, and only while an auto_aug graph is built.
_DALI_AUTO_AUG_DEPRECATION = re.compile(
    r"WARNING: `nvidia\.dali\.fn\.experimental\.(filter|equalize)` is now deprecated")


class _QuietAutoAugDeprecations(warnings.catch_warnings):
    """warnings.catch_warnings that drops DALI's auto_aug deprecation warnings and passes every other on."""

    def __enter__(self):
        log = super().__enter__()
        warnings.filterwarnings("ignore", message=_DALI_AUTO_AUG_DEPRECATION.pattern, category=DeprecationWarning)
        shown = warnings.showwarning  # the handler in place (a test's recorder, pytest's, or Python's own)

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DeprecationWarning) and _DALI_AUTO_AUG_DEPRECATION.match(str(message)):
                return
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning  # put back by catch_warnings on exit
        return log


def _rand_augment(images, layers: int, magnitude: int, magnitude_std: float):
    """DALI's RandAugment (nvidia.dali.auto_aug) on uint8 HWC images. With magnitude_std > 0 each image
    takes a magnitude from a normal around `magnitude` (timm's "mstd"), discretised to the nearest of
    five values, m-2..m+2: one RandAugment branch each, chosen per sample by a DALI conditional."""
    with _QuietAutoAugDeprecations():
        return _rand_augment_graph(images, layers, magnitude, magnitude_std)


def _trivial_augment(images):
    """DALI's TrivialAugment-wide on uint8 HWC images, as torchvision's TrivialAugmentWide: 31 magnitude bins,
    shifts of up to 32 px, and what the affine operations uncover filled with black (torchvision's fill, where
    DALI's default is grey)."""
    with _QuietAutoAugDeprecations():
        return trivial_augment.trivial_augment_wide(images, num_magnitude_bins=RANDAUGMENT_MAX + 1, fill_value=0)


def _rand_augment_graph(images, layers: int, magnitude: int, magnitude_std: float):
    if magnitude_std <= 0:
        return rand_augment.rand_augment(images, n=layers, m=magnitude)
    choices = [m for m in range(magnitude - 2, magnitude + 3) if 0 <= m <= 30]
    weights = [math.exp(-0.5 * ((m - magnitude) / magnitude_std) ** 2) for m in choices]
    picked = fn.random.choice(choices, p=[w / sum(weights) for w in weights])
    for m in choices:  # unrolled at build time; each `if` becomes a DALI conditional branch
        if picked == m:
            images = rand_augment.rand_augment(images, n=layers, m=m)
    return images


def training_pipeline(files, labels, *, shard_id, num_shards, aug: Augmentation, placement, dtype,
                      hw_decoder_load: float, fused_decode: bool):
    jpegs, labels = _reader(files, labels, shard_id, num_shards, training=True)
    decoder = _decoder_args(placement, hw_decoder_load)
    size = aug.image_size
    on_host = placement == "cpu"  # DALI's CPU resize, colour and normalisation are its slow part: pipelines.dali_host
    mirror = fn.random.coin_flip(probability=aug.hflip)
    # on the host without uint8 operators after the resize (RandAugment, TrivialAugment: aug.auto_augment): resize,
    # flip, jitter and normalisation in one python step, right after the fused decode
    one_pass = on_host and fused_decode and not aug.auto_augment
    factors = []
    if aug.color_jitter > 0:
        strength = list(aug.jitter_range)  # clamped at 0 as torchvision's (a strength above 1)
        factors = [fn.random.uniform(range=strength) for _ in ("brightness", "contrast", "saturation")]
    if fused_decode:
        # Decodes only the crop's region: less work than decoding the whole JPEG, then cropping.
        images = fn.decoders.image_random_crop(
            jpegs, **decoder, output_type=types.RGB,
            random_area=list(aug.crop_area), random_aspect_ratio=list(aug.crop_ratio), num_attempts=100,
        )
        if one_pass:
            images = _normalize_on_host(images, dtype, aug.normalize, factors, size, mirror)
        elif on_host:  # resized and flipped by torch, as torchvision's RandomResizedCrop and RandomHorizontalFlip
            images = fn.python_function(images, mirror, function=dali_host.HostSteps(size=size),
                                        batch_processing=True, output_layouts="HWC")
        else:
            images = fn.resize(_after_decode(images, placement), resize_x=size, resize_y=size)
    else:
        # The way out where the fused ROI decode misbehaves (nvImageCodec #55; docs/usage.md, Troubleshooting
        # the GPU path)
        images = _after_decode(fn.decoders.image(jpegs, **decoder, output_type=types.RGB), placement)
        images = fn.random_resized_crop(images, size=[size, size],
                                        random_area=list(aug.crop_area), random_aspect_ratio=list(aug.crop_ratio))
        if on_host:
            images = fn.flip(images, horizontal=mirror)
    if aug.randaugment_magnitude > 0:
        images = _rand_augment(images, aug.randaugment_layers, aug.randaugment_magnitude,
                               aug.randaugment_magnitude_std)
    if aug.trivial_augment:
        images = _trivial_augment(images)
    if on_host and not one_pass:  # the colour jitter (color_twist's map, a fifth of its cost) in this pass
        images = _normalize_on_host(images, dtype, aug.normalize, factors)
    elif not on_host:
        if factors:
            images = fn.color_twist(images, brightness=factors[0], contrast=factors[1], saturation=factors[2])
        images = _normalize(images, dtype, mirror=mirror, normalize=aug.normalize)
    if aug.random_erase > 0:  # last, on the normalised pixels, as torchvision's RandomErasing (pipelines.erasing)
        images = dali_erase(images, aug.random_erase, size)
    return images, _labels(labels, placement)


def _round_half_even(x):
    """Python's round() on a DALI node holding values k/2 (k integer), as torchvision's centre crop uses."""
    half = dmath.floor(x)
    is_half = (x - half) * 2  # 1 where x = k + 0.5, else 0
    half_is_odd = half - 2 * dmath.floor(half / 2)
    return half + is_half * half_is_odd


def validation_pipeline(files, labels, *, shard_id, num_shards, aug: Augmentation, placement, dtype,
                        hw_decoder_load: float):
    """Resize the shorter side to val_size / val_resize_ratio (256 for 224), centre crop val_size (the
    training image_size unless val_image_size sets its own).

    Sizes and the crop anchor are computed as torchvision's Resize + CenterCrop compute them (longer side
    truncated, anchor rounded half to even): DALI's own rounding differs by up to one pixel, which moves
    accuracies and breaks comparison with torchvision-trained weights (docs/design.md, Validation transform).
    """
    jpegs, labels = _reader(files, labels, shard_id, num_shards, training=False)
    # H, W, C as decoded: DALI's decoders apply the EXIF orientation, so the shape must too (tags 5-8 swap
    # height and width); adjust_orientation is DALI's default, spelled out because the sizes depend on it
    shape = fn.cast(fn.peek_image_shape(jpegs, adjust_orientation=True), dtype=types.FLOAT)
    height, width = shape[0], shape[1]
    short = dmath.min(height, width)
    image_size = aug.val_size
    target = float(aug.val_resize_to)
    new_h = dmath.floor(target * height / short)
    new_w = dmath.floor(target * width / short)
    images = fn.decoders.image(jpegs, **_decoder_args(placement, hw_decoder_load), output_type=types.RGB)
    images = fn.resize(_after_decode(images, placement), resize_x=new_w, resize_y=new_h)
    anchor = fn.stack(_round_half_even((new_h - image_size) / 2), _round_half_even((new_w - image_size) / 2))
    # Anchor and shape as CPU inputs: a GPU slice whose anchor or shape lives on the GPU copies it back to
    # the host and synchronises every batch. A plain list would become a constant on the images' device.
    shape = types.Constant(np.array([image_size, image_size], dtype=np.int32), device="cpu")
    images = fn.slice(images, fn.cast(anchor, dtype=types.INT32), shape, axes=[0, 1], out_of_bounds_policy="pad")
    if placement == "cpu":
        return _normalize_on_host(images, dtype, aug.normalize), _labels(labels, placement)
    return _normalize(images, dtype, normalize=aug.normalize), _labels(labels, placement)


def describe_decode(training: bool, placement: str, fused: bool, hw_decoder_load: float) -> str:
    """The decode path in words, as the benchmark report names it."""
    where = (f"nvJPEG on the GPU (mixed, hw_decoder_load {hw_decoder_load:g}, fancy upsampling)"
             if placement == "gpu" else "libjpeg-turbo on DALI's CPU threads")
    rest = ", the rest on the GPU" if placement == "hybrid" else ""
    if not training:
        return f"{where}, then resize and centre crop{' on the GPU' if rest else ''}"
    if fused:
        return (f"{where}, fused with RandomResizedCrop (decoders.image_random_crop: decodes the crop's region "
                f"only){rest}")
    return f"{where}, whole image, then RandomResizedCrop{' on the GPU' if rest else ''} (--no-fused-decode)"


def make_iterator(pipe, training: bool, epoch_size: int | None = None) -> "DALIGenericIterator":
    """Training: DROP with the reader's name, so every rank gets floor(N / world) samples and the same
    number of full batches. Validation: PARTIAL over the padded reader, so the padding is dropped and,
    summed over ranks, every validation image is counted exactly once.

    `epoch_size` (samples per shard): an epoch shorter than the reader's own, as repeated augmentation
    needs: the reader streams its k-times-longer list on, and each of our epochs takes the next part; or the
    exact epoch of an external source, which has no reader name (pipelines.dali_shards)."""
    sizing = {"size": epoch_size} if epoch_size is not None else {"reader_name": _READER}
    with warnings.catch_warnings():  # DALI warns about `size`; a shorter epoch is what we want here
        warnings.filterwarnings("ignore", message="Please set `reader_name`")
        return DALIGenericIterator(
            [pipe],
            ["images", "labels"],
            last_batch_policy=LastBatchPolicy.DROP if training else LastBatchPolicy.PARTIAL,
            auto_reset=True,
            **sizing,
        )


class DaliBase(DaliCheckpoint):
    """What every DALI loader sets up alike, whatever feeds its reader (`fn.readers.file` over class folders,
    DaliLoader; tar members through an external source, pipelines.dali_shards.ShardDaliLoader): the split's
    counts, the pipeline's arguments, the graph at an image size, and DALI's outputs as the interface's
    batches. A subclass says what feeds the reader (`_reading`, before the first build) and builds (`_build`)."""

    @classmethod
    def from_request(cls, r, kind) -> "DaliBase":
        """The loader build_loader asked for (a pipelines.registry.Request), at the kind's placement."""
        s = r.settings
        return cls(r.split, **r.common(), local_rank=r.local_rank, placement=kind.placement, threads=s.dali_threads,
                   prefetch=s.prefetch, hw_decoder_load=s.hw_decoder_load, fused_decode=s.fused_decode)

    def __init__(self, split, *, image_list, batch_size, aug: Augmentation, rank, world_size, local_rank, seed,
                 device, dtype, placement, threads: int, prefetch: int, hw_decoder_load: float, fused_decode: bool):
        require_dali()
        self._begin(split, aug)
        self._list = image_list
        self.class_counts = image_list.class_counts()  # the loader interface: images per class of this split
        self.num_samples = len(self._list)
        self.num_classes = len(self._list.classes)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._host_batches = placement == "cpu"  # the CPU pipeline's batches live in host memory
        if self._host_batches:
            torch.get_num_threads()  # fixes this thread's count before DALI's thread sets its own (dali_host)
            keep_freed_memory()  # before the pipeline's threads take their malloc arenas
        self._build_args = dict(
            batch_size=batch_size,
            num_threads=threads,
            device_id=None if placement == "cpu" else local_rank,
            # a different augmentation stream per rank; the reader's epoch shuffle is shared by all ranks
            seed=seed * 1000 + rank,
            prefetch_queue_depth=prefetch,
            enable_checkpointing=True,
            enable_conditionals=self.training and aug.auto_augment,  # RandAugment and TrivialAugment need them
        )
        # what the harness reports as the decode path it measured (fused ROI decode or decode-then-crop)
        self.decode = describe_decode(self.training, placement, fused_decode, hw_decoder_load)
        define = training_pipeline if self.training else validation_pipeline
        options = {"hw_decoder_load": hw_decoder_load, **({"fused_decode": fused_decode} if self.training else {})}
        # the graph over a reader's input at an image size: a resolution change rebuilds the pipeline at the new
        # size (pipelines.loader.DaliCheckpoint). It holds no reference to this loader: a loader <-> pipeline
        # cycle would keep the pipeline and its buffers alive until the garbage collector ran
        training = self.training
        self._define = lambda files, labels, size: define(files, labels, shard_id=rank, num_shards=world_size,
                                                          aug=replace(aug, image_size=size) if training else aug,
                                                          placement=placement, dtype=dtype, **options)
        if placement == "gpu" and training and fused_decode:
            # nvImageCodec 0.9's region-of-interest decode can crash the process (docs/usage.md, Troubleshooting
            # the GPU path): tried first in a child on this GPU, so a crash becomes one line naming the way out
            probe_fused_decode(probe_images(image_list), local_rank, define=training_pipeline, aug=aug, dtype=dtype,
                               hw_decoder_load=hw_decoder_load)
        self._reading(rank=rank, world_size=world_size, seed=seed, threads=threads)
        self._build(checkpoint=None)

    def _reading(self, *, rank: int, world_size: int, seed: int, threads: int) -> None:
        """What feeds the reader, set up once before the first build."""
        raise NotImplementedError

    def _pipeline(self, files, labels, checkpoint):
        """The pipeline over the reader's input (files and labels, or an external source and None), at
        `self.image_size`, continuing from a DALI checkpoint (None: from the start)."""
        define, size = self._define, self.image_size
        return pipeline_def(lambda: define(files, labels, size), **self._build_args, checkpoint=checkpoint)()

    def _batch(self, outputs):
        """DALI's outputs as (images [N, 3, H, W] channels_last, labels int64 [N]) on the device."""
        images = outputs[0]["images"].permute(0, 3, 1, 2)  # NHWC -> NCHW view: channels_last, no copy
        labels = outputs[0]["labels"].view(-1).long()
        if self._host_batches:
            with named_range("host-to-device copy"):  # a no-op range when the device is the CPU too
                if images.device != self.device:  # the CPU pipeline feeding a GPU
                    images = images.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
        return images, labels


class DaliLoader(DaliBase):
    """The loader interface (docs/design.md) over a DALI pipeline reading class folders (fn.readers.file) and
    DALIGenericIterator."""

    def _reading(self, *, rank: int, world_size: int, seed: int, threads: int) -> None:
        # Repeated augmentation: every image k times in the reader's list, so its k copies, shuffled
        # apart, are augmented independently (and mostly land on different ranks); an epoch still
        # delivers N images, N / world per rank.
        self._files, self._labels, self._epoch_size = self._list.files, self._list.labels, None
        k = self._aug.repeated_aug
        if self.training and k > 1:
            self._files = tuple(f for f in self._files for _ in range(k))
            self._labels = tuple(label for label in self._labels for _ in range(k))
            self._epoch_size = self.num_samples // world_size

    def _build(self, checkpoint):
        pipe = self._pipeline(self._files, self._labels, checkpoint)
        self._iterator = make_iterator(pipe, self.training, self._epoch_size)

    def __len__(self) -> int:
        return len(self._iterator)

    def __iter__(self):
        for outputs in self._iterator:
            yield self._batch(outputs)


def release_unused_memory() -> None:
    """Hand DALI's wholly free pool blocks back (device pools and pinned host memory): its pools never shrink by
    themselves, so pipelines built and dropped one after another would otherwise keep the largest one's memory.
    A block a live pipeline or batch still holds stays. DALI walks only the pools it already made: on a machine
    without CUDA it frees nothing and initialises nothing. A no-op without DALI."""
    if fn is not None:
        from nvidia.dali.backend import ReleaseUnusedMemory

        ReleaseUnusedMemory()
