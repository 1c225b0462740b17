"""One row of the loader shootout, measured alone in this process (benchmarks/shootout.py starts one per row
per round): `python -m benchmarks.shootout_rows --row NAME --data DIR ...` prints one JSON line.

The task of every loader row: RandomResizedCrop to 224 px (the recipe's area and ratio) + horizontal flip +
normalise, delivered as fp16 batches on the CPU, with `workers` DataLoader workers or DALI threads; colour
jitter off but in the +jitter row. Our rows are the project's own loaders, built by pipelines.build_loader; the
reference row is torchvision's ImageFolder, DataLoader and transforms as torchvision's reference training
script writes them; the bound row decodes whole images with libjpeg-turbo and does nothing else.

A pass: warm-up batches (untimed), the tree settles (benchmarks.cpu_time: every loader fills its bounded queue,
then waits), one pass over `images` images, the tree settles again. CPU per image is the CPU time of this
process and its descendants between the two settled moments, over the images consumed; img/s is those images
over the time from the first reading to the moment the loader's work ended.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import sys
import time
import warnings
from pathlib import Path

from benchmarks.cpu_time import Tree, settle
from rn50.config.errors import UserError

OURS = {"dali-cpu": ("dali-cpu", False), "dali-cpu+jitter": ("dali-cpu", True), "torchvision": ("torchvision", False),
        "torchvision-gpu": ("torchvision-gpu", False)}  # row -> (loader kind, colour jitter on)
REFERENCE, BOUND = "reference:torchvision+PIL", "bound:decode"
# torchvision-gpu on the CPU costs about 5x the others per image (batched dense resampling, built for a GPU):
# a quarter pass keeps its rounds as long as theirs; its CPU time per image is exact whatever the pass's length
PASS_SHARE = {"torchvision-gpu": 0.25}
ROWS = (*OURS, REFERENCE, BOUND)
IMAGE_SIZE = 224
WARMUP_BATCHES = 2
DECODERS = ("torchvision.io.decode_jpeg", "PIL")
# torchvision 0.29 deprecates its decoders (torchcodec replaces them): the bound measures libjpeg-turbo, not that
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated")


def our_loader(row: str, data: Path, batch_size: int, workers: int, seed: int):
    """The project's loader for this row, as training builds it: fp16, channels_last, on the CPU."""
    import torch

    from pipelines import build_loader
    from pipelines.augmentation import Augmentation

    kind, jitter = OURS[row]
    return build_loader(kind, "train", data, batch_size=batch_size, image_size=IMAGE_SIZE, seed=seed, device="cpu",
                        dtype=torch.float16, workers=workers, dali_threads=workers, preflight=False,
                        color_jitter=Augmentation().color_jitter if jitter else 0.0)


def reference_batches(data: Path, batch_size: int, workers: int, seed: int):
    """torchvision's way (references/classification/presets.py, ClassificationPresetTrain with its PIL backend,
    and train.py's DataLoader), then the batch to fp16 and channels_last here, as a training loop would.
    persistent_workers: a pass crosses an epoch boundary of a small set, which training meets once an epoch."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from pipelines.augmentation import Augmentation

    aug = Augmentation()
    transform = transforms.Compose([
        transforms.RandomResizedCrop(IMAGE_SIZE, scale=aug.crop_area, ratio=aug.crop_ratio, antialias=True),
        transforms.RandomHorizontalFlip(aug.hflip),
        transforms.PILToTensor(),
        transforms.ConvertImageDtype(torch.float),
        transforms.Normalize(mean=aug.mean, std=aug.std),
    ])
    torch.manual_seed(seed)
    loader = DataLoader(datasets.ImageFolder(str(data / "train"), transform), batch_size=batch_size, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    while True:
        for images, labels in loader:
            yield images.to(torch.float16).contiguous(memory_format=torch.channels_last), labels


def loader_pass(row: str, data: Path, images: int, batch_size: int, workers: int, seed: int) -> dict:
    """One timed pass of a loader row (ours or the reference)."""
    import torch

    from pipelines.loader import endless

    torch.manual_seed(seed)
    if row == REFERENCE:
        batches = reference_batches(data, batch_size, workers, seed)
        decode = "PIL in DataLoader worker processes, torchvision transforms (v1), default collate"
    else:
        loader = our_loader(row, data, batch_size, workers, seed)
        batches, decode = endless(loader), loader.decode
    for _ in range(WARMUP_BATCHES):
        next(batches)
    tree = Tree()  # the workers exist now
    _, ready = settle(tree)
    cpu0, start = tree.read(), time.perf_counter()
    count = 0
    for _ in range(max(2, int(images * PASS_SHARE.get(row, 1.0)) // batch_size)):
        batch, _labels = next(batches)
        count += batch.shape[0]
    delivered = time.perf_counter()
    tree.refresh()
    polls = time.thread_time()
    ended, settled = settle(tree)
    cpu = tree.read() - (time.thread_time() - polls) - cpu0  # settle's polls are not the loader's work
    channels_last = batch.is_contiguous(memory_format=torch.channels_last)
    return {"images": count, "wall_s": max(ended, delivered) - start, "cpu_s": cpu, "settled": ready and settled,
            "decode": decode, "delivered": f"{str(batch.dtype).removeprefix('torch.')} {list(batch.shape)}"
                                            f"{' channels_last' if channels_last else ''}"}


# ---------------------------------------------------------------------------------------------- bound:decode

def decoder(name: str):
    """A function from a JPEG's bytes (a bytearray) to its whole RGB image, by libjpeg-turbo through torchvision or PIL."""
    if name == "PIL":
        from PIL import Image

        def decode(raw: bytearray):
            with Image.open(io.BytesIO(raw)) as image:  # no draft(): the whole image, never a DCT-domain downscale
                return image.convert("RGB") if image.mode != "RGB" else image.load()
        return decode
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    torch.set_num_threads(1)
    return lambda raw: decode_jpeg(torch.frombuffer(raw, dtype=torch.uint8), mode=ImageReadMode.RGB)


def read_files(files: list[str]) -> list[bytearray]:
    """The files' bytes, writable (torch.frombuffer shares them without a copy, and warns on read-only bytes)."""
    return [bytearray(Path(f).read_bytes()) for f in files]


def faster_decoder(raws: list[bytearray]) -> str:
    """The decoder with the lower CPU time over these files, alternated three times (CPU time, not wall: it
    holds on a busy machine)."""
    spent = dict.fromkeys(DECODERS, 0.0)
    decoders = {name: decoder(name) for name in DECODERS}
    for _ in range(3):
        for name in DECODERS:
            begin = time.process_time()
            for raw in raws:
                decoders[name](raw)
            spent[name] += time.process_time() - begin
    return min(spent, key=spent.get)


def decode_worker(name: str, files: list[str], ready, go, done, leave) -> None:
    """One process of the bound: its files read into memory, two decoded to warm up, then the rest timed (the
    deprecation filter above holds here too: the process imports this module to run this function)."""
    decode = decoder(name)
    raws = read_files(files)
    for raw in raws[:2]:
        decode(raw)
    ready.wait()
    go.wait()
    for raw in raws:
        decode(raw)
    done.put(len(raws))
    leave.wait()  # alive until the parent has read its CPU time


def decode_pass(data: Path, images: int, workers: int, seed: int, name: str | None) -> dict:
    """libjpeg-turbo decoding whole images to RGB, one process per worker, each over its share of the files."""
    import random

    from pipelines.folder import list_split

    files = [str(f) for f in list_split(data, "train").files]
    files = random.Random(seed).sample(files, min(images, len(files)))
    name = name or faster_decoder(read_files(files[:16]))
    context = multiprocessing.get_context("forkserver")  # a clean process: no torch threads forked mid-state
    ready, go, leave, done = context.Barrier(workers + 1), context.Event(), context.Event(), context.Queue()
    procs = [context.Process(target=decode_worker, args=(name, files[i::workers], ready, go, done, leave))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    try:
        ready.wait(timeout=300)
        tree = Tree()
        cpu0, start = tree.read(), time.perf_counter()
        go.set()
        count = sum(done.get(timeout=600) for _ in procs)
        wall, cpu = time.perf_counter() - start, tree.read() - cpu0
    finally:
        leave.set()
        for proc in procs:
            proc.join(timeout=30)
    return {"images": count, "wall_s": wall, "cpu_s": cpu, "settled": True, "decoder": name,
            "decode": f"libjpeg-turbo through {name}, whole images, {workers} processes",
            "delivered": "uint8 RGB, whole image"}


def measure(row: str, data: Path, images: int, batch_size: int, workers: int, seed: int,
            decoder_name: str | None = None) -> dict:
    if row not in ROWS:
        raise UserError(f"unknown shootout row {row!r}; choose one of {', '.join(ROWS)}")
    if row == BOUND:
        result = decode_pass(data, images, workers, seed, decoder_name)
    else:
        result = loader_pass(row, data, images, batch_size, workers, seed)
    return {"row": row, **result, "img_per_s": result["images"] / result["wall_s"],
            "cpu_ms_per_img": 1e3 * result["cpu_s"] / result["images"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shootout_rows", description=__doc__.splitlines()[0])
    p.add_argument("--row", required=True, choices=ROWS)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoder", choices=DECODERS, default=None, help="bound:decode's (default: the faster here)")
    args = p.parse_args(argv)
    try:
        result = measure(args.row, args.data, args.images, args.batch_size, args.workers, args.seed, args.decoder)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
