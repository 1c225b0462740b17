"""--autotune: sweep DALI threads, hw_decoder_load and prefetch depth in loader mode (every DALI loader measured); keep
the best when it beats the settings the run was given beyond the noise (benchmarks.noise, the report's one rule).

That best setting is saved as a recipe preset, `OUT/autotuned.toml`, which rn50.train (and this harness)
read with `--preset OUT/autotuned.toml`. A best inside the noise of the given settings is no finding: nothing is
written, and the report says so.
"""

from __future__ import annotations

import itertools
import os
import statistics

from benchmarks.noise import FASTER, compare
from pipelines.registry import REGISTRY
from rn50.system.dist import all_gather_objects

HW_DECODER_LOADS = (0.0, 0.5, 0.65, 0.8, 0.9, 1.0)  # only the GPU pipeline has a hardware decoder
PREFETCH_DEPTHS = (1, 2, 3)


def thread_counts(world_size: int) -> list[int]:
    """Powers of two up to the cores each process can have (the local processes share the cores)."""
    cores = max(1, (os.cpu_count() or 1) // max(1, world_size))
    counts = [1]
    while counts[-1] * 2 <= cores:
        counts.append(counts[-1] * 2)
    return counts if counts[-1] == cores else counts + [cores]


def grid(loader: str, world_size: int) -> list[dict]:
    loads = HW_DECODER_LOADS if loader == "dali" else (None,)
    return [{"dali_threads": t, "prefetch": p, **({"hw_decoder_load": h} if h is not None else {})}
            for t, h, p in itertools.product(thread_counts(world_size), loads, PREFETCH_DEPTHS)]


def given(bench, loader: str) -> dict:
    """The setting the run was given (its machine settings), in the grid's terms."""
    machine = bench.machine
    return {"dali_threads": machine.dali_threads, "prefetch": machine.prefetch,
            **({"hw_decoder_load": machine.hw_decoder_load} if loader == "dali" else {})}


def sweep(bench, plan, out) -> dict | None:
    """Loader-mode img/s (all ranks together) for every setting of every DALI loader in the plan, the given
    setting among them; the best, and whether it beats the given one beyond the noise."""
    results = {}
    for loader in (name for name in plan.loaders if REGISTRY[name].dali):
        rows, baseline = [], given(bench, loader)
        settings = grid(loader, bench.env.world_size)
        for setting in settings + ([baseline] if baseline not in settings else []):
            windows, _ = bench.windows(bench.loader(loader, **setting), None)
            per_window = [sum(all_gather_objects(w.img_per_s)) for w in windows]  # all ranks, window by window
            rows.append({**setting, "img_per_s": statistics.fmean(per_window), "img_per_s_windows": per_window,
                         "given": setting == baseline})
            if bench.env.is_main:
                print(f"  autotune {loader} {setting}: {rows[-1]['img_per_s']:.1f} img/s", flush=True)
        best = max(rows, key=lambda row: row["img_per_s"])
        mine = next(row for row in rows if row["given"])
        against = compare(best["img_per_s_windows"], mine["img_per_s_windows"], paired=False)
        results[loader] = {"sweep": rows, "best": best, "given": mine, "best_vs_given": against,
                           "found": against["word"] == FASTER}
    if not results:
        return None
    # the GPU pipeline's best when it was swept (it is the one to train with), else the first one swept
    loader = "dali" if "dali" in results else next(iter(results))
    preset = None
    if out is not None and results[loader]["found"]:
        lines = ["# Written by `python -m benchmarks.run --autotune`: the fastest loader-mode setting.",
                 "# Use it with: python -m rn50.train --preset THIS_FILE ...", f'loader = "{loader}"']
        lines += [f"{key} = {value}" for key, value in results[loader]["best"].items()
                  if key not in ("img_per_s", "img_per_s_windows", "given")]
        (out / "autotuned.toml").write_text("\n".join(lines) + "\n")
        preset = str(out / "autotuned.toml")
    return {"loaders": results, "preset": preset, "preset_loader": loader}
