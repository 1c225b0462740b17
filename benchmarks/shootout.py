"""The loader shootout: `python -m benchmarks.shootout --out DIR [--data DIR]` measures the CPU cost per image
of every CPU loader on the same task and the same photo-like JPEGs, against plain torchvision and against
libjpeg-turbo's whole-image decode (issue 39; docs/benchmarks.md, The loader shootout).

Each row runs alone in its own process (benchmarks/shootout_rows.py), one at a time, once per round; the
rounds run forward and backward in turn (benchmarks.noise.round_order). A row's figures: img/s (median, min,
max over the rounds) and CPU milliseconds per image (the median), the CPU time of the row's process and all its
descendants over a pass (benchmarks/cpu_time.py). CPU time per image holds on a busy machine; img/s does not.

Without --data it makes its data set once (tools.make_dataset --photo-like: 1,000 images, 4 classes) and
keeps it in a cache folder named after the generator's source, so a rerun starts measuring at once.
Writes DIR/shootout.json and DIR/shootout.md, and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.noise import round_order, spread
from benchmarks.shootout_rows import BOUND, IMAGE_SIZE, ROWS, WARMUP_BATCHES
from benchmarks.shootout_table import describe_data, environment, markdown
from rn50.config.errors import UserError

OPTIONAL = ("torchvision-gpu",)  # a GPU loader run on the CPU: measured, but its failure fails nothing
CLASSES = 4
SEED = 0
ROW_TIMEOUT_S = 900


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shootout", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder for shootout.json and shootout.md")
    p.add_argument("--data", type=Path, default=None,
                   help="folder with train/<class>/*.JPEG (default: a photo-like set made once and cached)")
    p.add_argument("--cache", type=Path, default=None,
                   help="where the made data set is kept (default: $RN50_CACHE, else ~/.cache/rn50)")
    p.add_argument("--rounds", type=int, default=6, help="rounds; each measures every row once (default 6)")
    p.add_argument("--images", type=int, default=1000,
                   help="images per pass of a row, and the made set's size (default 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="default 64")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader workers, DALI threads, decoding processes of every row (default 2)")
    p.add_argument("--loaders", default=",".join(ROWS), help=f"rows, comma-separated (default all: {','.join(ROWS)})")
    p.add_argument("--image-side", type=int, nargs=2, default=(300, 500), metavar=("MIN", "MAX"),
                   help="the made set's shorter side range, px (default 300 500; tests use tiny images)")
    return p.parse_args(argv)


def check(args) -> list[str]:
    """The flags, before anything is made or measured; returns the rows asked for, in ROWS's order."""
    rows = [name.strip() for name in args.loaders.split(",") if name.strip()]
    unknown = [name for name in rows if name not in ROWS]
    if unknown or not rows:
        raise UserError(f"--loaders: unknown row(s) {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(ROWS)}")
    for flag in ("rounds", "images", "batch_size", "workers"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.images < args.batch_size:
        raise UserError(f"--images ({args.images}) is less than one batch of --batch-size {args.batch_size}; "
                        "raise --images or lower --batch-size")
    if args.data is not None and not (args.data / "train").is_dir():
        raise UserError(f"--data {args.data} has no train/ folder of class folders; pass an ImageNet-style "
                        "folder, or leave --data out to make a photo-like set")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot make --out {args.out} ({exc.strerror}); pass a writable folder") from None
    return [name for name in ROWS if name in rows]


def made_data(cache: Path | None, images: int, sides: tuple[int, int]) -> Path:
    """The photo-like set for these settings: made once, into a folder named by the generator's source and the
    arguments (a changed generator makes a new set), and reused after."""
    from tools import make_dataset, photo_like

    source = b"".join(Path(m.__file__).read_bytes() for m in (make_dataset, photo_like))
    per_class = -(-images // CLASSES)
    key = hashlib.sha256(source + repr((CLASSES, per_class, SEED, sides)).encode()).hexdigest()[:12]
    root = cache or Path(os.environ.get("RN50_CACHE") or Path.home() / ".cache" / "rn50")
    folder = root / "shootout" / f"photo-like-{CLASSES * per_class}-{key}"
    if (folder / "done").exists():
        return folder
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    print(f"making the photo-like data set ({CLASSES * per_class} images) in {folder} (once)", flush=True)
    make_dataset.make_dataset(partial, CLASSES, per_class, 1, SEED, min_side=sides[0], max_side=sides[1],
                              progress=False, photo_like=True)
    (partial / "done").touch()
    try:
        partial.rename(folder)
    except OSError:  # another run made it meanwhile: use theirs
        pass
    return folder


def run_row(row: str, args, data: Path, number: int, decoder: str | None) -> dict:
    """One row's pass, alone in a fresh process; a failure is a dict with its reason in one line."""
    command = [sys.executable, "-m", "benchmarks.shootout_rows", "--row", row, "--data", str(data),
               "--images", str(args.images), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--seed", str(number)] + (["--decoder", decoder] if decoder else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=ROW_TIMEOUT_S,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return {"failed": f"took over {ROW_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    said = [line for line in done.stderr.strip().splitlines() if line.strip()]
    reason = next((line for line in said if line.startswith("error:")), said[-1] if said else "no output")
    return {"failed": f"exit {done.returncode}: {reason.strip()[:300]}"}


def summarise(row: str, parts: list[dict]) -> dict:
    """A row's rounds as its figures: img/s median, min, max; CPU ms per image the median (and its spread)."""
    good = [part for part in parts if "failed" not in part]
    if not good:
        return {"name": row, "status": "failed", "reason": parts[-1]["failed"], "required": row not in OPTIONAL}
    rates, cpu = [p["img_per_s"] for p in good], [p["cpu_ms_per_img"] for p in good]
    last = good[-1]
    return {"name": row, "status": "ok", "median_img_per_s": statistics.median(rates), "min": min(rates),
            "max": max(rates), "cpu_ms_per_img": statistics.median(cpu), "cpu_ms_per_img_min": min(cpu),
            "cpu_ms_per_img_max": max(cpu), "cpu_ms_spread": spread(cpu), "img_per_s_spread": spread(rates),
            "rounds": len(good), "failed_rounds": len(parts) - len(good), "img_per_s_rounds": rates,
            "cpu_ms_per_img_rounds": cpu, "images_per_round": last["images"],
            "settled": all(p["settled"] for p in good), "decode": last["decode"], "delivered": last["delivered"],
            **({"decoder": last["decoder"]} if "decoder" in last else {}), "required": row not in OPTIONAL}


def measure(rows: list[str], args, data: Path) -> list[dict]:
    parts: dict[str, list[dict]] = {row: [] for row in rows}
    decoder = None  # bound:decode picks its decoder in the first round; the later rounds keep it
    for number in range(args.rounds):
        for row in round_order(rows, number):
            if parts[row] and all("failed" in part for part in parts[row]):
                continue  # failed in every round so far: a broken row, not noise
            part = run_row(row, args, data, number, decoder)
            parts[row].append(part)
            if "failed" in part:
                print(f"  round {number + 1}/{args.rounds} {row:26s} FAILED: {part['failed']}", flush=True)
                continue
            decoder = part.get("decoder", decoder)
            print(f"  round {number + 1}/{args.rounds} {row:26s} {part['img_per_s']:8.1f} img/s "
                  f"{part['cpu_ms_per_img']:6.2f} CPU ms/img", flush=True)
    results = [summarise(row, parts[row]) for row in rows]
    bound = next((r for r in results if r["name"] == BOUND and r["status"] == "ok"), None)
    for result in results:
        if bound and bound["cpu_ms_per_img"] > 0 and result["status"] == "ok":  # 0: tiny images, coarse ticks
            result["cpu_vs_decode"] = result["cpu_ms_per_img"] / bound["cpu_ms_per_img"]
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    try:
        rows = check(args)
        env = environment()  # the commit and versions measured, read before a long run, not after it
        data = args.data or made_data(args.cache, args.images, tuple(args.image_side))
        print(f"shootout: {len(rows)} rows x {args.rounds} rounds over {data}", flush=True)
        results = measure(rows, args, data)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    report = {"rows": results, "environment": {**env, "load_average": list(os.getloadavg())},
              "settings": {"rounds": args.rounds, "images": args.images, "batch_size": args.batch_size,
                           "workers": args.workers, "image_size": IMAGE_SIZE, "warmup_batches": WARMUP_BATCHES,
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                           "command": "python -m benchmarks.shootout " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv)},
              "data": describe_data(data, made=args.data is None), "seconds": round(time.time() - started, 1)}
    (args.out / "shootout.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "shootout.md").write_text(table)
    print(table, flush=True)
    failed = [r["name"] for r in results if r["status"] != "ok" and r["required"]]
    if failed:
        print(f"error: required row(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
