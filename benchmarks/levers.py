"""--levers: every speed lever measured on the same data in one run, in the manner of airbench.

Each lever is one named change to the recipe or the machine settings, with one line on why it is faster.
The baseline is the configuration the harness was given (the recipe's defaults unless flags change them):
a lever that is off there is measured switched on; one that is on already (fused SGD, cuDNN autotuning,
channels-last, gradients as bucket views) is measured switched off, so its row says what it is worth. Every
lever is measured on synthetic data (the GPU ceiling) and end to end (the first loader of --loaders), as the
harness's modes say; then the best combination, written as a preset (`OUT/levers.toml`).

A lever that cannot run here (CUDA-only on a CPU machine, multi-GPU ones in one process) is listed as not
measured, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from benchmarks.noise import FASTER, compare
from rn50.config.errors import UserError
from rn50.config.recipe import MACHINE_FIELDS, RECIPE_FIELDS, get, resolve


@dataclass(frozen=True)
class Lever:
    name: str
    why: str
    on: dict  # flat recipe/machine fields that switch it on
    off: dict  # and off (the baseline's value when it is on there)
    needs: str = ""  # "cuda" or "ranks": where it can be measured at all


def _levers() -> dict[str, Lever]:
    levers = [
        Lever("compile", "torch.compile fuses the elementwise tails of conv/BN/ReLU into few kernels and cuts "
                         "launches; compile time is reported apart", {"compile": True}, {"compile": False}),
        Lever("compile-max-autotune", "torch.compile that also times candidate kernels (GEMM/conv templates) "
                                      "and keeps the fastest; minutes of compile time",
              {"compile": True, "compile_mode": "max-autotune"}, {"compile": False}, "cuda"),
        Lever("cuda-graphs", "the whole step captured once and replayed: no per-kernel launch cost on the host, "
                             "the GPU never waits for Python", {"cuda_graphs": True}, {"cuda_graphs": False}, "cuda"),
        Lever("bf16", "bf16 autocast instead of fp16: same tensor-core speed, no loss scaling (no GradScaler "
                      "syncs or skipped steps)", {"amp_dtype": "bfloat16"}, {"amp_dtype": "float16"}, "cuda"),
        Lever("fused-sgd", "one fused optimizer kernel for all parameters instead of one launch per tensor "
                           "group", {"fused_optimizer": True}, {"fused_optimizer": False}, "cuda"),
        Lever("cudnn-benchmark", "cuDNN times its algorithms once per shape and keeps the fastest (shapes are "
                                 "static)", {"cudnn_benchmark": True}, {"cudnn_benchmark": False}, "cuda"),
        Lever("channels-last", "NHWC tensors: tensor-core convolutions without layout transposes",
              {"channels_last": True}, {"channels_last": False}),
        Lever("bucket-view", "DDP gradients live in the all-reduce buckets: no copy in or out",
              {"ddp_bucket_view": True}, {"ddp_bucket_view": False}, "ranks"),
        Lever("fp16-compress", "gradients all-reduced in fp16: half the bytes, for PCIe machines without NVLink "
                               "(4x RTX 3090), where the all-reduce can cost more than the convolutions",
              {"ddp_fp16_compress": True}, {"ddp_fp16_compress": False}, "ranks"),
    ]
    return {lever.name: lever for lever in levers}


LEVERS = _levers()
_SIZED = {  # levers with a number in the name: batch512, bucket100mb
    re.compile(r"batch(\d+)"): lambda n: Lever(
        f"batch{n}", f"{n} images per GPU (peak LR scaled with the global batch): fewer, fuller steps",
        {"batch_size": n}, {}),
    re.compile(r"bucket(\d+)mb"): lambda n: Lever(
        f"bucket{n}mb", f"DDP buckets of {n} MiB: fewer, larger all-reduces (default 25)",
        {"ddp_bucket_mb": n}, {}, "ranks"),
}
NAMES_HELP = ", ".join(LEVERS) + ", batchN (e.g. batch512), bucketNmb (e.g. bucket100mb), or all"


def parse_levers(text: str) -> list[Lever]:
    """`compile,cuda-graphs,batch512` or `all` (every named lever and batch size twice the baseline's)."""
    chosen = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        if name == "all":
            chosen += [lever for lever in LEVERS.values() if lever not in chosen]
            continue
        lever = LEVERS.get(name)
        for pattern, make in _SIZED.items():
            match = pattern.fullmatch(name)
            if match and int(match[1]) >= 1:
                lever = make(int(match[1]))
        if lever is None:
            raise UserError(f"unknown lever {name!r}; choose from {NAMES_HELP}")
        if lever not in chosen:
            chosen.append(lever)
    if not chosen:
        raise UserError(f"--levers is empty; name some of {NAMES_HELP}")
    return chosen


def _current(recipe, machine, flat: str):
    return getattr(machine, MACHINE_FIELDS[flat].name) if flat in MACHINE_FIELDS else get(recipe, flat)


def variant(lever: Lever, recipe, machine) -> tuple[str, dict]:
    """What the lever's row measures against the baseline: ("on", fields) when the baseline has it off,
    ("off", fields) when the baseline has it on already."""
    if all(_current(recipe, machine, flat) == value for flat, value in lever.on.items()) and lever.off:
        return "off", lever.off
    return "on", lever.on


def why_not_here(lever: Lever, device: torch.device, world_size: int) -> str | None:
    if lever.needs == "cuda" and device.type != "cuda":
        return "needs a CUDA GPU"
    if lever.needs == "ranks" and world_size < 2:
        return "needs several processes (DDP all-reduce): run the harness under torchrun"
    return None


def measure_levers(bench, levers: list[Lever], modes: tuple[str, ...], loader: str | None, flops,
                   measured: list[dict] = ()) -> dict:
    """The baseline, each lever and the best combination: synthetic (the ceiling) and end to end through
    `loader` as `modes` ask. `bench` is a benchmarks.measure.Bench; `flops(recipe)` gives the function from
    img/s per GPU to MFU; `measured`: the harness's own results, which are the baseline's already."""
    done = {(r["mode"], r["loader"]): r for r in measured}
    env, recipe, machine = bench.env, bench.recipe, bench.machine
    kinds = [("synthetic", "synthetic")] if "synthetic" in modes else []
    kinds += [("train", loader)] if loader and "train" in modes else []
    if not kinds:
        raise UserError("--levers measures training steps: include synthetic or train in --modes")
    say = print if env.is_main else (lambda *a, **k: None)

    def row_for(name: str, why: str, state: str, fields: dict) -> dict:
        reuse = done if not fields else {}
        try:
            lever_recipe, lever_machine = with_lever(recipe, machine, fields)
        except UserError as err:
            return {"lever": name, "why": why, "state": state, "fields": fields, "measured": False,
                    "reason": str(err)}
        variant_bench = bench.with_settings(lever_recipe, lever_machine)
        row = {"lever": name, "why": why, "state": state, "fields": fields, "measured": True, "reason": None,
               "batch_size": lever_recipe.optimisation.batch_size}
        per_image = flops(lever_recipe)
        for _, kind in kinds:
            try:
                result = reuse.get(("train", kind)) or reuse.get((kind, kind)) or variant_bench.measure("train", kind)
            except UserError as err:  # e.g. a batch larger than the data: this lever only
                return {**row, "measured": False, "reason": str(err)}
            key = "synthetic" if kind == "synthetic" else "end_to_end"
            row[key] = {"img_per_s": result["img_per_s"], "img_per_s_per_gpu": result["img_per_s_per_gpu"],
                        "img_per_s_windows": result.get("img_per_s_windows"),
                        "img_per_s_spread": result.get("img_per_s_spread"),
                        "mfu": per_image(result["img_per_s_per_gpu"]),
                        "memory_peak_gib": result.get("memory_peak_gib"), "compile_s": result.get("compile_s")}
            say(f"  lever {name:22s} {state:3s} {key:10s} {result['img_per_s']:10.1f} img/s", flush=True)
        if "synthetic" in row and "end_to_end" in row:
            row["end_to_end"]["of_synthetic"] = row["end_to_end"]["img_per_s"] / row["synthetic"]["img_per_s"]
        return row

    baseline = row_for("baseline", "the configuration given (eager unless flags say otherwise)", "-", {})
    if not baseline["measured"]:
        raise UserError(f"the baseline could not be measured: {baseline['reason']}")
    rows = [baseline]
    for lever in levers:
        state, fields = variant(lever, recipe, machine)
        reason = why_not_here(lever, env.device, env.world_size)
        if reason:
            rows.append({"lever": lever.name, "why": lever.why, "state": state, "fields": fields,
                         "measured": False, "reason": reason})
            continue
        rows.append(row_for(lever.name, lever.why, state, fields))
    key = "end_to_end" if any(kind != "synthetic" for _, kind in kinds) else "synthetic"

    def ratio(row: dict) -> dict:
        if row["measured"]:
            row["ratio_to_baseline"] = row[key]["img_per_s"] / baseline[key]["img_per_s"]
        return row

    rows = [ratio(row) for row in rows]
    candidate = best_combination(rows, key, lambda fields: check_preset(fields, recipe, machine, env.device))
    best_fields, withheld = {}, None
    if candidate:  # measured before it is written: levers can cost each other what each gained alone
        combined = ratio(row_for("best combination", "every lever faster than the baseline beyond the noise, "
                                 "together", "on", candidate))
        rows.append(combined)
        if not combined["measured"]:
            withheld = f"the combination could not be measured: {combined['reason']}"
        elif not beats_baseline(combined, baseline, key):
            withheld = (f"the combination measured {combined['ratio_to_baseline']:.2f}x the baseline, within "
                        "noise")
        else:
            best_fields = candidate
    return {"ranked_by": key, "loader": loader if key == "end_to_end" else None, "rows": rows,
            "candidate_fields": candidate, "best_fields": best_fields, "not_written": withheld, "preset": None}


def beats_baseline(row: dict, baseline: dict, key: str) -> bool:
    """Faster than the baseline by the report's one noise rule (benchmarks.noise): beyond the two measurements'
    spreads added (they were measured one after the other, not in rounds), never with the noise unknown."""
    mine, theirs = (row.get(key) or {}).get("img_per_s_windows"), (baseline.get(key) or {}).get("img_per_s_windows")
    return bool(mine and theirs) and compare(mine, theirs, paired=False)["word"] == FASTER


def check_preset(fields: dict, recipe, machine, device: torch.device) -> None:
    """Raise UserError if training would refuse these fields over this recipe and machine: the checks
    rn50.train runs at start-up (Recipe/Machine.validate, check_cuda_only_settings), not a copy of them."""
    from rn50.core.step import check_cuda_only_settings  # torch: here, so the harness's flags parse without it

    check_cuda_only_settings(*with_lever(recipe, machine, fields), device)


def with_lever(recipe, machine, fields: dict):
    """The baseline's recipe and machine with a lever's fields over them, through rn50.config.recipe.resolve (the
    baseline as its lowest layer, the fields as flags), so a lever is checked as any run is."""
    config = resolve(fields, defaults={**{flat: get(recipe, flat) for flat in RECIPE_FIELDS}, **machine.to_dict()})
    return config.recipe, config.machine


def best_combination(rows: list[dict], key: str, check=None) -> dict:
    """The fields of every measured lever whose state beat the baseline (rows[0]) beyond the noise
    (beats_baseline). A lever measured "off" that beat the baseline means the machine is faster without it:
    its off setting joins. Fastest first: a lever that sets a field a faster one set (batch256 after
    batch512), or that `check(fields)` refuses beside the faster ones (cuda-graphs with max-autotune), stays
    out. Each row considered gets "joined" and, when left out, "left_out" (why)."""
    fields: dict = {}
    baseline = rows[0]
    for row in sorted(rows[1:], key=lambda r: r.get("ratio_to_baseline", 0), reverse=True):
        if not row["measured"]:
            continue
        row["joined"], row["left_out"] = False, None
        if not beats_baseline(row, baseline, key):
            row["left_out"] = "its gain is within noise" if row.get("ratio_to_baseline", 0) > 1 \
                else "not faster than the baseline"
            continue
        taken = [flat for flat in row["fields"] if flat in fields]
        if taken:
            row["left_out"] = f"a faster lever sets {', '.join(taken)}"
            continue
        if check is not None:
            try:
                check({**fields, **row["fields"]})
            except UserError as err:
                row["left_out"] = f"conflicts with the faster levers: {err}"
                continue
        fields.update(row["fields"])
        row["joined"] = True
    return fields


def write_preset(fields: dict, path) -> None:
    """The best combination as a preset (`--preset OUT/levers.toml`), recipe fields and machine settings in
    their own tables so that rn50.train and the harness read it."""
    recipe_lines, machine_lines = [], []
    for flat, value in fields.items():
        text = str(value).lower() if isinstance(value, bool) else (f'"{value}"' if isinstance(value, str) else value)
        (recipe_lines if flat in RECIPE_FIELDS else machine_lines).append(f"{flat} = {text}")
    lines = ["# Written by `python -m benchmarks.run --levers`: the levers that beat the baseline, together.",
             "# Use it with: python -m rn50.train --preset THIS_FILE ...", *recipe_lines]
    if machine_lines:
        lines += ["", "[machine]", *machine_lines]
    path.write_text("\n".join(lines) + "\n")
