"""Class folders (or a tools.scan manifest) -> WebDataset tar shards that every loader reads.

    python -m tools.shard SRC --out DST [--shard-size 1GiB | --images-per-shard N] [--seed 0]
                                        [--manifest SCAN] [--verify]
    python -m tools.shard DST --verify              (re-read shards written before)

SRC is the ImageNet layout (`SRC/train/<class>/*.JPEG`, `SRC/val/<class>/*.JPEG`). Per split, the files are
listed in the loaders' order (sorted class folders, labels from the training split), put in one global
shuffle (seeded by --seed: a shard holds every class, not one) and written in that order into shards of at
most --shard-size bytes (default 1 GiB) or --images-per-shard images. A sample is `KEY.<ext>`, the image's
bytes untouched, and `KEY.cls`, its class index as text (WebDataset's convention); KEY is the sample's
position in the split. Beside each `<split>-NNNNNN.tar` goes its DALI index (`.idx`, the format of DALI's
`wds2idx`), and per split one members table (`<split>-members.npy`: shard, offset, size and label of every
sample, so a loader learns the whole split in one read); `dataset.json` lists classes, counts, shards with
sizes and sha256 checksums, and the files left out. pipelines/shards.py documents the format.

Bad files are left out and listed (dataset.json and the summary), judged by the header check training's
pre-flight runs (pipelines.jpeg_check); a full decode is tools.scan's job: scan first and pass
`--manifest SCAN` to shard its list of good files.

Deterministic: the same SRC and options give byte-identical shards. Resumable: each shard is written to a
temporary name and renamed when complete, and `DST/.progress.jsonl` records it; run the same command again
after an interruption and the finished shards are kept. `dataset.json` is written last, so a folder with
one is complete. Nothing is written into SRC.

Exit codes: 0 done (and verified with --verify), 1 --verify found a damaged shard, 2 a user error.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.errors import UserError
from pipelines.folder import SPLITS, class_names, list_split
from pipelines.jpeg_check import find_header_problems
from pipelines.shards import DATASET_JSON, FORMAT, split_identity
from tools.progress import bar as progress_bar

PROGRESS = ".progress.jsonl"
TAR_BLOCK = 512
DEFAULT_SHARD_BYTES = 1 << 30
EXT_NAMES = {".jpeg": "jpg", ".jpg": "jpg", ".png": "png", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff",
             ".webp": "webp"}


@dataclass(frozen=True)
class Options:
    """How `shard` writes, read once from the flags: --shard-size in bytes, the rest as given."""
    shard_bytes: int = DEFAULT_SHARD_BYTES
    images_per_shard: int | None = None
    seed: int = 0
    manifest: Path | None = None
    quiet: bool = False


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise UserError(f"--shard-size {text!r} is not a size; write e.g. 1GiB, 512MiB or 100000000") from None
    if value < TAR_BLOCK * 4:
        raise UserError(f"--shard-size {text} is too small for a tar shard; give at least 2KiB (1GiB is usual)")
    return int(value)


def _member_bytes(size: int) -> int:
    """A tar member's footprint: its 512-byte header and its data padded to whole blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def plan_split(files, labels, sizes, seed: int, max_bytes: int, max_images: int | None, split: str):
    """[(shard name, [(key, path, label, size), ...]), ...]: the global shuffle cut into shards in order."""
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(files))
    shards, current, used = [], [], 0
    for position, i in enumerate(order):
        cost = _member_bytes(sizes[i]) + _member_bytes(len(str(labels[i])))
        if current and (used + cost > max_bytes or (max_images and len(current) >= max_images)):
            shards.append(current)
            current, used = [], 0
        current.append((f"{position:09d}", files[i], labels[i], sizes[i]))
        used += cost
    if current:
        shards.append(current)
    return [(f"{split}-{n:06d}.tar", samples) for n, samples in enumerate(shards)]


class _HashingWriter:
    """A file that hashes what is written through it, and knows its position (tar offsets)."""

    def __init__(self, f):
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.f.write(data)
        self.sha.update(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # fixed metadata: the same input gives byte-identical shards
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    return info


def write_shard(dest: Path, name: str, samples, shard_number: int) -> tuple[dict, list]:
    """One shard and its DALI index, each written under a temporary name then renamed. Returns its
    dataset.json record and its members [(shard, offset, size, label)]."""
    tmp = dest / (name + ".partial")
    members, index_lines = [], []
    with open(tmp, "wb") as raw:
        out = _HashingWriter(raw)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, path, label, _ in samples:
                data = Path(path).read_bytes()  # the image's bytes, untouched
                ext = EXT_NAMES[Path(path).suffix.lower()]
                parts = []
                for member, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                    offset = out.tell() + TAR_BLOCK  # a USTAR header is one block (short names: no pax header)
                    tar.addfile(_tarinfo(member, len(payload)), io.BytesIO(payload))
                    parts.append(f"{member.partition('.')[2]} {offset} {len(payload)} {member}")
                    if member.endswith(".cls"):
                        continue
                    members.append((shard_number, offset, len(payload), label))
                index_lines.append(" ".join(parts))
        raw.flush()
        os.fsync(raw.fileno())
        size, sha = out.pos, out.sha.hexdigest()
    index_name = name.removesuffix(".tar") + ".idx"
    (dest / (index_name + ".partial")).write_text(f"v1.2 {len(samples)}\n" + "\n".join(index_lines) + "\n")
    os.replace(dest / (index_name + ".partial"), dest / index_name)
    os.replace(tmp, dest / name)
    return {"name": name, "index": index_name, "count": len(samples), "size": size, "sha256": sha}, members


def _list_sources(src: Path, manifest: Path | None, split: str):
    try:
        return list_split(str(src), split, None if manifest is None else str(manifest))
    except UserError:
        if split == "train":
            raise
        return None  # no validation split: shards of training only


def _plan_digest(src: Path, options: Options, listing) -> str:
    blob = json.dumps({"src": str(src.resolve()), "seed": options.seed, "bytes": options.shard_bytes,
                       "images": options.images_per_shard, "manifest": str(options.manifest),
                       "files": {split: [len(files), hashlib.sha256("\n".join(files).encode()).hexdigest()]
                                 for split, (files, _, _) in listing.items()}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_progress(dest: Path, digest: str) -> dict:
    """Shards finished by an interrupted run of the same command (same sources and options)."""
    path = dest / PROGRESS
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines or lines[0].get("plan") != digest:
        return {}
    done = {}
    for record in lines[1:]:
        shard = dest / record["shard"]["name"]
        if shard.is_file() and shard.stat().st_size == record["shard"]["size"] and \
                (dest / record["shard"]["index"]).is_file():
            done[record["shard"]["name"]] = record
    return done


def shard(src: Path, dest: Path, options: Options, say=print) -> dict:
    if not src.is_dir():
        raise UserError(f"{src} is not a folder; pass the dataset folder with train/<class>/*.JPEG as SRC")
    if (src / DATASET_JSON).is_file():
        raise UserError(f"{src} already holds shards ({DATASET_JSON}); to check them run `python -m tools.shard "
                        f"{src} --verify`")
    if dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents:
        raise UserError(f"--out {dest} is inside {src}; write the shards elsewhere (SRC is never written to)")
    if (dest / DATASET_JSON).is_file():
        raise UserError(f"{dest} already holds finished shards ({DATASET_JSON}); pass a new --out, or delete it")
    classes = class_names(str(src))
    listing, left_out = {}, {}
    for split in SPLITS:
        image_list = _list_sources(src, options.manifest, split)
        if image_list is None:
            continue
        files, labels = list(image_list.files), list(image_list.labels)
        if options.manifest is None:  # a manifest's files were decoded by tools.scan already
            problems = find_header_problems(files)
            bad = {path for path, _ in problems}
            left_out[split] = [{"path": path, "reason": reason} for path, reason in problems]
            kept = [(f, label) for f, label in zip(files, labels) if f not in bad]
            if not kept:
                raise UserError(f"every file of {src / split} is bad (first: {problems[0][0]}: {problems[0][1]}); "
                                "fix the data or run `python -m tools.scan`")
            files, labels = [f for f, _ in kept], [label for _, label in kept]
        else:
            left_out[split] = []
        listing[split] = (files, labels, [os.path.getsize(f) for f in files])
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {dest} ({exc.strerror}); pass a writable folder") from None
    digest = _plan_digest(src, options, listing)
    done = _read_progress(dest, digest)
    if done:
        say(f"resuming: {len(done)} shards of an interrupted run are complete and kept")
    else:
        (dest / PROGRESS).write_text(json.dumps({"plan": digest}) + "\n")
    plans = {split: plan_split(*listing[split], options.seed, options.shard_bytes, options.images_per_shard, split)
             for split in listing}
    total = sum(len(files) for files, _, _ in listing.values())
    started = time.perf_counter()
    meta = {"format": FORMAT, "classes": list(classes), "seed": options.seed, "source": str(src.resolve()),
            "shard_bytes": options.shard_bytes, "images_per_shard": options.images_per_shard, "splits": {}}
    with progress_bar(total, "sharding", unit="images", enabled=not options.quiet) as progress:
        for split, plan in plans.items():
            records, members = [], []
            for number, (name, samples) in enumerate(plan):
                if name in done:
                    record, shard_members = done[name]["shard"], done[name]["members"]
                else:
                    record, shard_members = write_shard(dest, name, samples, number)
                    with open(dest / PROGRESS, "a") as log:  # after the rename: a listed shard is complete
                        log.write(json.dumps({"shard": record, "members": shard_members}) + "\n")
                records.append(record)
                members += [tuple(m) for m in shard_members]
                progress.update(len(samples))
            table = np.asarray(members, dtype=np.int64).reshape(-1, 4)
            buffer = io.BytesIO()
            np.save(buffer, table, allow_pickle=False)
            table_name = f"{split}-members.npy"
            (dest / table_name).write_bytes(buffer.getvalue())
            files, labels, sizes = listing[split]
            entry = {"count": len(files),
                     "class_counts": np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes)).tolist(),
                     "bytes": int(sum(sizes)),
                     "members": {"name": table_name, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()},
                     "shards": records, "left_out": left_out[split]}
            entry["identity"] = split_identity(classes, entry)
            meta["splits"][split] = entry
    meta["seconds"] = round(time.perf_counter() - started, 3)
    tmp = dest / (DATASET_JSON + ".partial")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, dest / DATASET_JSON)  # last: a folder with dataset.json is complete
    (dest / PROGRESS).unlink(missing_ok=True)
    return meta


def verify(dest: Path, quiet: bool = False) -> list[str]:
    """Re-read every shard: its sha256 and size against dataset.json, and every member the table lists at
    the offset and size the tar itself gives. Returns the problems (empty when all is well)."""
    from pipelines.shards import read_dataset
    from pipelines.storage import LocalStore

    meta = read_dataset(LocalStore(str(dest)))
    problems = []
    total = sum(s["size"] for entry in meta["splits"].values() for s in entry["shards"])
    with progress_bar(total, "verifying", unit="bytes", enabled=not quiet) as progress:
        for split, entry in meta["splits"].items():
            table_path = dest / entry["members"]["name"]
            if not table_path.is_file() or hashlib.sha256(table_path.read_bytes()).hexdigest() != entry["members"]["sha256"]:
                problems.append(f"{table_path.name}: missing or not matching its checksum")
                continue
            table = np.load(table_path, allow_pickle=False)
            for number, record in enumerate(entry["shards"]):
                path = dest / record["name"]
                if not path.is_file():
                    problems.append(f"{record['name']}: missing")
                    continue
                sha = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        sha.update(block)
                        progress.update(len(block))
                if path.stat().st_size != record["size"] or sha.hexdigest() != record["sha256"]:
                    problems.append(f"{record['name']}: size or sha256 differs from {DATASET_JSON}")
                    continue
                with tarfile.open(path) as tar:
                    found = sorted((m.offset_data, m.size) for m in tar.getmembers() if not m.name.endswith(".cls"))
                listed = sorted(map(tuple, table[table[:, 0] == number][:, 1:3].tolist()))
                if found != listed:
                    problems.append(f"{record['name']}: its members differ from {entry['members']['name']}")
            if len(table) != entry["count"]:
                problems.append(f"{split}: {len(table)} members listed, {entry['count']} counted")
    return problems


def summary(meta: dict, dest: Path) -> str:
    lines = []
    for split, entry in meta["splits"].items():
        gib = sum(s["size"] for s in entry["shards"]) / 2**30
        left = f", {len(entry['left_out'])} left out" if entry["left_out"] else ""
        lines.append(f"{split}: {entry['count']} images in {len(entry['shards'])} shards ({gib:.3f} GiB){left}")
        for bad in entry["left_out"][:10]:
            lines.append(f"  left out: {bad['path']}: {bad['reason']}")
        if len(entry["left_out"]) > 10:
            lines.append(f"  ... and {len(entry['left_out']) - 10} more (all in {dest / DATASET_JSON})")
    lines.append(f"wrote {dest / DATASET_JSON} in {meta['seconds']:.1f} s")
    return "\n".join(lines)


def parse_args(argv) -> tuple[argparse.Namespace, Options]:
    """The flags, and the write's options built from them (nothing is written into the flags)."""
    parser = argparse.ArgumentParser(prog="python -m tools.shard", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="dataset folder (train/<class>/, val/<class>/), or with --verify alone "
                                               "a shard folder")
    parser.add_argument("--out", type=Path, help="the shard folder to write")
    parser.add_argument("--shard-size", default="1GiB", help="largest shard in bytes (1GiB, 256MiB, ...)")
    parser.add_argument("--images-per-shard", type=int, default=None, help="at most this many images per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle at write time")
    parser.add_argument("--manifest", type=Path, default=None, help="a tools.scan output folder: shard its good files")
    parser.add_argument("--verify", action="store_true", help="re-read every shard afterwards (or alone: SRC's shards)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    shard_bytes = parse_size(args.shard_size)
    if args.images_per_shard is not None and args.images_per_shard < 1:
        raise UserError(f"--images-per-shard {args.images_per_shard} must be 1 or more")
    return args, Options(shard_bytes, args.images_per_shard, args.seed, args.manifest, args.quiet)


def main(argv=None) -> None:
    try:
        args, options = parse_args(argv)
        if args.out is None:
            if not args.verify:
                raise UserError("pass --out DST (the shard folder to write), or --verify alone to check shards")
            dest = args.src
        else:
            dest = args.out
            print(summary(shard(args.src, args.out, options), args.out), flush=True)
        if args.verify:
            problems = verify(dest, quiet=args.quiet)
            for problem in problems:
                print(f"damaged: {problem}", file=sys.stderr)
            if problems:
                print(f"verify: {len(problems)} problems in {dest}; write the shards again", file=sys.stderr)
                sys.exit(1)
            print(f"verify: every shard in {dest} reads back as dataset.json records it", flush=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
