"""Compare runs side by side: `python -m benchmarks.compare RUN_OR_REPORT ... --out DIR`.

Reads any number of harness reports (a `benchmarks.run --out` folder, or its report.json) and training runs
(an `rn50.train` run folder, or its summary.json), from this machine or copied from others, and writes into
--out one Markdown table (compare.md), the same rows as JSON (compare.json) and the plots (compare.png):
img/s in all and per GPU, % of the synthetic ceiling, MFU, input stall, joules per image, a 90-epoch ImageNet
estimate and the time to a target top-1 where a run has one; then each run's environment (GPU, count,
versions, commit) and every setting that differs between them. Settings that make img/s figures unlike
(image size, batch, loader, architecture, precision) are flagged above the table, never silently compared.

Exit codes: 0 written, 2 a user error (an input that is neither a report nor a run: one line says which and
what to pass).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.text import NA, num as _num, pct as _pct
from rn50.config.errors import UserError

# Settings under which two img/s figures are not like for like: a difference is flagged, not compared away
KEY_SETTINGS = ("image_size", "batch_size", "loader", "arch", "amp", "amp_dtype", "channels_last", "precision")
ENV_FIELDS = ("gpu", "gpu_count", "world_size", "torch", "torchvision", "dali", "cuda", "driver", "python",
              "hostname", "git_commit", "git_dirty")
# the harness's window plan: it differs between reports without making img/s unlike
PLAN_SETTINGS = ("warmup_steps", "timed_steps", "repeats", "modes")
# where results were sent, not how they were made: left out of the differences
IGNORED = ("tracker", "tracker_project", "tracker_group")
HOW_TO = ("pass a benchmarks.run --out folder (or its report.json) or an rn50.train run folder (or its "
          "summary.json)")


# ---- reading ----------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}); {HOW_TO}") from None
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); {HOW_TO}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds no JSON object; {HOW_TO}")
    return value


def _jsonl(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed run: the others still count
            if isinstance(record, dict):
                records.append(record)
    return records


def load(arg: str) -> dict:
    """One input, as {kind, path, folder, report | summary/recipe/machine/metrics}."""
    path = Path(arg)
    if path.is_dir():
        if (path / "report.json").is_file():
            return _bench(path / "report.json")
        if (path / "summary.json").is_file() or (path / "recipe.json").is_file():
            return _training(path)
        raise UserError(f"{path} holds neither report.json nor summary.json/recipe.json; {HOW_TO}")
    if path.is_file():
        data = _read_json(path)
        if str(data.get("schema", "")).startswith("rn50-bench/"):
            return _bench(path, data)
        if "recipe" in data and "train/img_per_s" in data:
            return _training(path.parent, data)
        raise UserError(f"{path} is neither a harness report (schema rn50-bench/1) nor an rn50.train summary; "
                        f"{HOW_TO}")
    raise UserError(f"{path} does not exist; {HOW_TO}")


def _bench(path: Path, data: dict | None = None) -> dict:
    report = data or _read_json(path)
    for key in ("environment", "config", "results"):
        if key not in report:
            raise UserError(f"{path} lacks '{key}': not a complete harness report; {HOW_TO}")
    return {"kind": "bench", "path": path, "folder": path.parent, "report": report}


def _training(folder: Path, summary: dict | None = None) -> dict:
    if summary is None and (folder / "summary.json").is_file():
        summary = _read_json(folder / "summary.json")
    recipe = summary.get("recipe") if summary else None
    if recipe is None:
        recipe = _read_json(folder / "recipe.json")  # an unfinished run: no summary yet
    machine = (summary or {}).get("machine")
    if machine is None and (folder / "machine.json").is_file():
        machine = _read_json(folder / "machine.json")
    facts = _read_json(folder / "recipe.json") if (folder / "recipe.json").is_file() else {}
    return {"kind": "train", "path": folder, "folder": folder, "summary": summary, "recipe": recipe,
            "machine": machine or {}, "facts": facts, "metrics": _jsonl(folder / "metrics.jsonl")}


# ---- one input's settings and rows -----------------------------------------------------------------

def _flat_recipe(recipe: dict) -> dict:
    from rn50.config.recipe import flat_items, resolve

    try:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in flat_items(resolve(saved=recipe).recipe).items()}
    except (UserError, TypeError, ValueError):  # a recipe of another version: its own keys, flattened
        flat = {}
        for key, value in recipe.items():
            flat.update(value if isinstance(value, dict) else {key: value})
        return flat


def settings_of(entry: dict) -> dict:
    """Flat settings by their flat names (the recipe, the machine, the harness's plan), for the differences."""
    if entry["kind"] == "bench":
        config, env = entry["report"]["config"], entry["report"]["environment"]
        settings = {**_flat_recipe(config.get("recipe", {})), **config.get("machine", {})}
        settings.update({k: config.get(k) for k in ("arch", "batch_size", "image_size", "global_batch")})
        settings["loader"] = ",".join(config.get("loaders") or []) or "synthetic"
        settings.update({k: config.get(k) for k in PLAN_SETTINGS if k in config})
        settings["world_size"] = env.get("world_size")
        settings["dataset"] = (config.get("dataset") or {}).get("path")
        settings["measured_by"] = "benchmarks.run"
    else:
        settings = {**_flat_recipe(entry["recipe"]), **entry["machine"]}
        summary, facts = entry["summary"] or {}, entry["facts"]
        world = summary.get("world_size") or facts.get("world_size")
        settings["world_size"] = world
        settings["global_batch"] = summary.get("global_batch") or facts.get("global_batch")
        settings["dataset"] = summary.get("data")
        settings["measured_by"] = "rn50.train"
    return settings


def environment_of(entry: dict) -> dict:
    if entry["kind"] == "bench":
        env = entry["report"]["environment"]
    else:
        env = dict((entry["summary"] or {}).get("environment") or {})
        env.setdefault("world_size", settings_of(entry)["world_size"])
    return {k: env.get(k) for k in ENV_FIELDS}


def _time_to_train(img_per_s: float | None) -> float | None:
    from benchmarks.figures import time_to_train  # the harness's own estimate, the same for runs and reports

    return time_to_train(img_per_s)["total_hours"] if img_per_s else None


def _target(entry: dict, target: float | None) -> dict | None:
    """Time and epochs to `target` top-1 (the run's own --target-top1 when not given) from its epoch lines."""
    summary = entry["summary"] or {}
    if target is None:
        if summary.get("target"):
            return dict(summary["target"])
        target = _flat_recipe(entry["recipe"]).get("target_top1") or None
        if not target:
            return None
    for record in entry["metrics"]:
        if record.get("val/top1") is not None and record["val/top1"] >= target and "time_s" in record:
            return {"top1": target, "time_s": record["time_s"], "epochs": record.get("epoch")}
    return {"top1": target, "time_s": None, "epochs": None}  # not reached


def rows_of(entry: dict, label: str, target: float | None) -> list[dict]:
    """The measurements an input contributes: a report's synthetic ceiling and end-to-end rows (its loader-only
    rows when it has neither), a training run's steady-state img/s (epochs after the first)."""
    env = environment_of(entry)
    world = env.get("world_size") or 1
    if entry["kind"] == "bench":
        report = entry["report"]
        results = report["results"]
        shown = [r for r in results if r["mode"] in ("synthetic", "train")] or results
        verdicts, estimates = report.get("verdicts") or {}, report.get("time_to_train_90_epochs") or {}
        rows = []
        for r in shown:
            ratio = 1.0 if r["mode"] == "synthetic" else (verdicts.get(r["loader"]) or {}).get("ratio_to_synthetic")
            estimate = estimates.get(r["loader"]) if r["mode"] != "loader" else None
            telemetry = r.get("telemetry") or {}
            rows.append({"run": label, "kind": "bench", "measured": r["mode"] if r["mode"] == "synthetic"
                         else f"{r['mode']} {r['loader']}", "loader": r["loader"],
                         "img_per_s": r["img_per_s"], "img_per_s_per_gpu": r["img_per_s_per_gpu"],
                         "pct_of_ceiling": ratio, "mfu": r.get("mfu"),
                         "stall": (r.get("stall") or {}).get("fraction"),
                         "j_per_image": telemetry.get("energy_j_per_image") if telemetry.get("available") else None,
                         "hours_90_epochs": estimate["total_hours"] if estimate else _time_to_train(r["img_per_s"]),
                         "target": None})
        return rows
    summary, metrics = entry["summary"] or {}, entry["metrics"]
    epochs = [m for m in metrics if "val/top1" in m]
    img_per_s = summary.get("train/img_per_s")
    if img_per_s is None:  # unfinished: the epochs so far, the first (start-up costs) left out as summary does
        rates = [m["train/img_per_s"] for m in (epochs[1:] or epochs) if m.get("train/img_per_s") is not None]
        img_per_s = sum(rates) / len(rates) if rates else None
    settings = settings_of(entry)
    on_cpu = not env.get("gpu")
    waits = [m["train/host_wait_frac"] for m in (epochs[1:] or epochs) if m.get("train/host_wait_frac") is not None]
    joules = [m["gpu/energy_j_per_image"] for m in epochs if m.get("gpu/energy_j_per_image") is not None]
    return [{"run": label, "kind": "train", "measured": f"training {settings.get('loader', '?')}"
             + ("" if summary else " (unfinished)"), "loader": settings.get("loader"),
             "img_per_s": img_per_s, "img_per_s_per_gpu": img_per_s / world if img_per_s else None,
             "pct_of_ceiling": None, "mfu": _training_mfu(settings, env, img_per_s, world),
             # the host's wait in next() is input stall only on the CPU, where nothing runs asynchronously
             "stall": sum(waits) / len(waits) if waits and on_cpu else None,
             "j_per_image": sum(joules) / len(joules) if joules else None,
             "hours_90_epochs": _time_to_train(img_per_s), "target": _target(entry, target)}]


def _training_mfu(settings: dict, env: dict, img_per_s: float | None, world: int) -> float | None:
    from benchmarks.flops import flops_per_image, mfu, peak_tflops

    peak = peak_tflops(env.get("gpu"))
    if not (peak and img_per_s and settings.get("arch") and settings.get("image_size")):
        return None
    # the classifier's FLOPs are a rounding error beside the convolutions: ImageNet's 1000 classes stand in
    flops = flops_per_image(settings["arch"], settings["image_size"], 1000, blurpool=bool(settings.get("blurpool")))
    return mfu(img_per_s / world, flops, peak)


# ---- comparing --------------------------------------------------------------------------------------

def labels_for(entries: list[dict]) -> list[str]:
    """Each input's folder name; its parent's name in front where two are alike."""
    names = [e["folder"].resolve().name or str(e["folder"]) for e in entries]
    for i, name in enumerate(names):
        if names.count(name) > 1:
            names = [f"{e['folder'].resolve().parent.name}/{n}" if n == name else n for e, n in zip(entries, names)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return unique


def differences(settings: list[dict]) -> dict[str, list]:
    """Settings whose values are not the same in every input (absent counts as a value of its own)."""
    keys = list(dict.fromkeys(k for s in settings for k in s))
    return {k: [s.get(k) for s in settings] for k in keys if k not in IGNORED
            and len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1}


def compare(args_in: list[str], target: float | None = None) -> dict:
    entries = [load(arg) for arg in args_in]
    labels = labels_for(entries)
    settings = [settings_of(e) for e in entries]
    environments = [environment_of(e) for e in entries]
    rows = [row for e, label in zip(entries, labels) for row in rows_of(e, label, target)]
    diff = differences(settings)
    env_diff = differences(environments)
    # the loader is each row's own (a report measures several): compared row by row below, not input by input
    mismatched = {k: v for k, v in diff.items() if (k in KEY_SETTINGS and k != "loader") or k == "world_size"}
    loaders = {label: {row["loader"] for row in rows if row["run"] == label} - {"synthetic"} for label in labels}
    for row in rows:  # a loader that another input did not measure: that row has no like to compare with
        row["loader_unmatched"] = row["loader"] != "synthetic" and any(
            row["loader"] not in theirs for other, theirs in loaders.items() if other != row["run"] and theirs)
    kinds = {e["kind"] for e in entries}
    notes = []
    if len(kinds) > 1:
        notes.append("harness reports and training runs are measured differently: the harness times steady "
                     "windows after warm-up, a training run its whole epochs (the first left out), so compare "
                     "them as an indication only")
    return {"inputs": [{"run": label, "kind": e["kind"], "path": str(e["path"])} for e, label in zip(entries, labels)],
            "rows": rows, "environments": dict(zip(labels, environments)), "settings": dict(zip(labels, settings)),
            "differences": diff, "environment_differences": env_diff, "mismatched": mismatched, "notes": notes,
            "target_top1": target}


# ---- writing ----------------------------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return NA
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def _value(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value).replace("|", "\\|")


def _target_text(target: dict | None) -> str:
    if not target:
        return NA
    if target["time_s"] is None:
        return f"not reached ({target['top1']:g}%)"
    epochs = f", {target['epochs']:g} ep" if target.get("epochs") is not None else ""
    return f"{_duration(target['time_s'])}{epochs} to {target['top1']:g}%"


def markdown(result: dict) -> str:
    labels = [i["run"] for i in result["inputs"]]
    mismatched = result["mismatched"]
    lines = ["# Comparison", "", f"{len(labels)} inputs: " + ", ".join(
        f"`{i['run']}` ({'harness report' if i['kind'] == 'bench' else 'training run'}, {i['path']})"
        for i in result["inputs"]) + ".", ""]
    if mismatched:
        lines += ["**Not like for like.** These settings differ between the inputs, so their img/s figures were "
                  "measured under different conditions (the `differs` column repeats each row's values):", ""]
        for key, values in mismatched.items():
            lines.append(f"- **{key}** differs: " + ", ".join(f"{label} {_value(v)}" for label, v in zip(labels, values)))
        lines.append("")
    for note in result["notes"]:
        lines += [f"Note: {note}.", ""]
    differing = [k for k in mismatched]
    if any(row["loader_unmatched"] for row in result["rows"]):
        lines += ["Rows marked `loader=...` measured a loader that another input did not: compare them with care.",
                  ""]
    lines += ["## Throughput", "",
              "| run | measured | GPU | GPUs | img/s (all) | img/s per GPU | % of ceiling | MFU | stall | J/image | "
              "90 epochs (h) | time to top-1 | differs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        env = result["environments"][row["run"]]
        own = result["settings"][row["run"]]
        flags = [f"{k}={_value(own.get(k))}" for k in differing]
        flags += [f"loader={row['loader']}"] if row["loader_unmatched"] else []
        differs = ", ".join(flags) or "—"
        lines.append(
            f"| {row['run']} | {row['measured']} | {env.get('gpu') or 'CPU'} | {_num(env.get('world_size'), '{:d}')} | "
            f"{_num(row['img_per_s'])} | {_num(row['img_per_s_per_gpu'])} | {_pct(row['pct_of_ceiling'])} | "
            f"{_pct(row['mfu'])} | {_pct(row['stall'])} | {_num(row['j_per_image'], '{:.3f}')} | "
            f"{_num(row['hours_90_epochs'])} | {_target_text(row['target'])} | {differs} |")
    lines += ["", "% of ceiling: end-to-end img/s over the same report's synthetic img/s. Stall: the harness's "
              "input stall; for a training run, its host wait on CPU only. 90 epochs: ImageNet (1,281,167 "
              "images) at the measured speed, validation estimated, as benchmarks.run does; at each run's own "
              "image size and batch.", "", "## Environment", "",
              "| run | GPU | count | processes | torch | torchvision | DALI | CUDA | driver | Python | host | commit |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        e = result["environments"][label]
        commit = (e.get("git_commit") or NA)[:10] + ("+dirty" if e.get("git_dirty") else "")
        lines.append(f"| {label} | {e.get('gpu') or 'CPU'} | {_value(e.get('gpu_count'))} | "
                     f"{_value(e.get('world_size'))} | {_value(e.get('torch'))} | {_value(e.get('torchvision'))} | "
                     f"{_value(e.get('dali'))} | {_value(e.get('cuda'))} | {_value(e.get('driver'))} | "
                     f"{_value(e.get('python'))} | {_value(e.get('hostname'))} | {commit} |")
    lines += ["", "## Configuration differences", ""]
    diff = result["differences"]
    if diff:
        lines += ["| setting | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for key, values in diff.items():
            name = f"**{key}** ⚠" if key in mismatched else key
            lines.append(f"| {name} | " + " | ".join(_value(v) for v in values) + " |")
        lines += ["", "⚠: a setting that changes what img/s means (image size, batch, architecture, precision, "
                  "process count); the loader is each row's own, flagged in the `differs` column where another "
                  "input did not measure it."]
    else:
        lines.append("None: every input ran the same recipe and machine settings.")
    lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["img_per_s"] is not None]
    if not rows:
        return
    names = [f"{r['run']}\n{r['measured']}" for r in rows]
    panels = [("img/s, all GPUs", [r["img_per_s"] for r in rows]),
              ("img/s per GPU", [r["img_per_s_per_gpu"] for r in rows]),
              ("% of the synthetic ceiling", [100 * r["pct_of_ceiling"] if r["pct_of_ceiling"] is not None else None
                                              for r in rows])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 1.2 + 0.55 * len(rows)), sharey=True)
    for ax, (title, values) in zip(axes, panels):
        # a figure a run does not have (a training run's % of ceiling) is written n/a, not drawn as zero
        ax.barh(range(len(rows)), [v or 0 for v in values], color=[f"C{i % 10}" for i in range(len(rows))])
        ax.set_title(title)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        for y, value in enumerate(values):
            ax.text(value or 0, y, NA if value is None else f" {value:,.1f}", va="center", fontsize=7)
    if result["mismatched"]:
        fig.suptitle("not like for like, these differ: " + ", ".join(result["mismatched"]), color="C3")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path) -> str:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out} ({exc.strerror}); pass a writable folder as --out") from None
    text = markdown(result)
    (out / "compare.md").write_text(text)
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, out / "compare.png")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.compare", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("inputs", nargs="+", metavar="RUN_OR_REPORT",
                        help="benchmarks.run --out folders or report.json files; rn50.train run folders or "
                             "summary.json files")
    parser.add_argument("--out", required=True, type=Path, help="folder for compare.md, compare.json, compare.png")
    parser.add_argument("--target-top1", type=float, default=None, metavar="PCT",
                        help="time and epochs each training run took to reach this val top-1 (default: each run's "
                             "own --target-top1, where it had one)")

    def error(message):
        raise UserError(message)

    parser.error = error
    try:
        args = parser.parse_args(argv)
        text = write(compare(args.inputs, args.target_top1), args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(text)
    print(f"wrote {args.out / 'compare.md'}, compare.json and compare.png", flush=True)


if __name__ == "__main__":
    main()
