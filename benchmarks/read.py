"""The harness's `read` mode: raw reads from the data source, no decoding. Is the storage the bottleneck?

Each rank reads its share of the training split in the order training reads it (a global shuffle, so random
access, as an epoch does): whole files from class folders, tar members (byte ranges) from shards on a local
or network file system, ranged GETs from S3. Bytes/s and images/s, summed over ranks, set beside the loader
and train modes give the verdict:

- storage-bound: training is input-bound, and the source alone delivers little more than the loader does
  (reads are at most READ_MARGIN times the loader's images/s): faster storage, or shards, first;
- decode-bound: training is input-bound but the source delivers far more than the loader: the decode and
  augmentation (CPU cores, DALI's GPU decoder) are the limit, not the storage;
- compute-bound: training is not input-bound.

With `--compare-data OTHER` (the same data as folders and as shards) both sources are read and compared.
The page cache: a second read of a small data set comes from memory; the report says how many bytes were
read so that a figure from a set smaller than RAM is not taken for the disk's.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

READ_MARGIN = 1.5  # reads this much above the loader's img/s leave the storage out of the verdict


def _reader(data):
    """(kind, image count, read(i) -> bytes): the training split as pipelines.list_data lists it for every
    loader, class folders or shards."""
    from pipelines import list_data
    from pipelines.storage import is_s3

    listing = list_data(data, "train")
    if listing.shards:
        return ("s3 shards" if is_s3(data) else "shards"), len(listing), listing.images.read
    files = listing.images.files

    def read(i: int) -> bytes:
        with open(files[i], "rb") as f:  # an open per image: what a shared file system charges for
            return f.read()

    return "folders", len(files), read


def check_source(data) -> None:
    """List --compare-data as the read mode will (class folders, shards, S3): its one-line error now, if any."""
    from pipelines.errors import UserError

    try:
        _reader(data)
    except UserError as err:
        raise UserError(f"--compare-data: {err}") from None


def measure(data, *, rank: int = 0, world_size: int = 1, seed: int = 0, images: int = 512, threads: int = 8) -> dict:
    """One rank's raw read rate over up to `images` of its training images (the training order, epoch 0)."""
    from pipelines.shards import epoch_order
    from pipelines.storage import display

    kind, n, read = _reader(data)
    order = epoch_order(n, rank, world_size, seed, 0, True)[:images]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        begin = time.perf_counter()
        total = sum(len(b) for b in pool.map(read, order))
        seconds = time.perf_counter() - begin
    return {"source": display(data), "kind": kind, "images": len(order), "bytes": total, "seconds": seconds,
            "threads": threads, "img_per_s": len(order) / seconds, "bytes_per_s": total / seconds}


def verdict(read_img_per_s: float, results: list[dict]) -> dict:
    """Per loader: storage-bound, decode-bound or compute-bound, from read, loader and train img/s."""
    by = {(r["mode"], r["loader"]): r["img_per_s"] for r in results}
    out = {}
    for (mode, name), loader_rate in by.items():
        if mode != "loader":
            continue
        train = by.get(("train", name))
        ceiling = by.get(("synthetic", "synthetic"))
        input_bound = train is not None and ceiling is not None and train < 0.9 * ceiling
        if not input_bound and train is not None and ceiling is not None:
            call = "compute-bound"
        elif read_img_per_s <= READ_MARGIN * loader_rate:
            call = "storage-bound"
        else:
            call = "decode-bound"
        out[name] = {"verdict": call, "read_img_per_s": read_img_per_s, "loader_img_per_s": loader_rate,
                     "train_img_per_s": train}
    return out


def section(data, compare, results: list[dict], env, seed: int, threads: int, say) -> dict:
    """The report's `read` block: every source read on every rank, rates summed over ranks, the verdicts."""
    from rn50.system.dist import all_gather_objects

    rows = []
    for source in [data] + ([compare] if compare is not None else []):
        mine = measure(source, rank=env.rank, world_size=env.world_size, seed=seed, threads=threads)
        ranks = all_gather_objects(mine)
        row = {**ranks[0], "images": sum(r["images"] for r in ranks), "bytes": sum(r["bytes"] for r in ranks),
               "img_per_s": sum(r["img_per_s"] for r in ranks), "bytes_per_s": sum(r["bytes_per_s"] for r in ranks)}
        rows.append(row)
        say(f"  read      {row['kind']:14s} {row['img_per_s']:10.1f} img/s  {row['bytes_per_s'] / 2**20:8.1f} MiB/s "
            f"({row['source']})", flush=True)
    block = {"sources": rows, "verdicts": verdict(rows[0]["img_per_s"], results)}
    if len(rows) == 2:
        block["ratio"] = rows[1]["img_per_s"] / rows[0]["img_per_s"]
        say(f"  read      {rows[1]['kind']} / {rows[0]['kind']}: {block['ratio']:.2f}x", flush=True)
    for name, v in block["verdicts"].items():
        say(f"storage verdict for {name}: {v['verdict']} (reads {v['read_img_per_s']:.0f} img/s, loader "
            f"{v['loader_img_per_s']:.0f} img/s)", flush=True)
    return block
