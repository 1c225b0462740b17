"""tools.sweep's results: one row per run from what it left in its folder (recipe.json, summary.json,
metrics.jsonl), the best base LR per batch size, and the outputs: sweep.md, sweep.json and sweep.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tools.sweep_grid import BASE_BATCH, GridPoint

NA = "-"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def val_records(run_dir: Path) -> list[dict]:
    """The epoch-end records (those with val/top1), one per epoch in order. A resumed run appends records
    for epochs it logged before; the later record of an epoch wins. A torn last line (a killed run) is
    skipped."""
    by_epoch: dict[float, dict] = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "val/top1" in record:
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def collect_result(point: GridPoint, run_dir: Path, nproc: int, status: str, error: str | None,
                   ran: str) -> dict:
    """One table row from what the run left in its folder (also for failed runs: whatever epochs they
    finished still show)."""
    recipe = _read_json(run_dir / "recipe.json")
    summary = _read_json(run_dir / "summary.json")
    records = val_records(run_dir)
    top1 = [r["val/top1"] for r in records]
    return {
        "name": point.name,
        "run_dir": str(run_dir),
        "base_lr": point.base_lr,
        "batch_size": point.batch_size,
        "global_batch": recipe.get("global_batch", point.batch_size * nproc),
        "peak_lr": recipe.get("peak_lr"),  # as the run resolved it (None: it never got that far)
        "final_val_top1": top1[-1] if top1 else None,
        "best_val_top1": max(top1) if top1 else None,
        "final_val_loss": records[-1].get("val/loss") if records else None,
        "epochs_run": len(records),
        "epochs": recipe.get("schedule", {}).get("epochs", recipe.get("epochs")),  # older runs wrote it flat
        "img_per_s": summary.get("train/img_per_s"),
        "wall_s": summary.get("wall_s"),
        "status": status,
        "error": error,
        "ran": ran,  # "now", "earlier" (skipped: finished before) or "no"
        "val_top1_by_epoch": [[r["epoch"], r["val/top1"]] for r in records],
    }


def best_per_batch(rows: list[dict]) -> list[dict]:
    """For each batch size, the finished run with the highest best val top-1; ties go to the lower final
    val loss, then to the lower LR (the safer choice when the data cannot tell them apart)."""
    best = []
    for bs in dict.fromkeys(r["batch_size"] for r in rows):
        done = [r for r in rows if r["batch_size"] == bs and r["status"] == "ok" and r["best_val_top1"] is not None]
        if not done:
            best.append({"batch_size": bs, "base_lr": None, "run": None})
            continue
        winner = min(done, key=lambda r: (-r["best_val_top1"], _or_inf(r["final_val_loss"]), r["base_lr"]))
        best.append({"batch_size": bs, "base_lr": winner["base_lr"], "peak_lr": winner["peak_lr"],
                     "run": winner["name"], "best_val_top1": winner["best_val_top1"],
                     "final_val_loss": winner["final_val_loss"]})
    return best


def _or_inf(value) -> float:
    return math.inf if value is None else value


def _fmt(value, spec: str) -> str:
    return NA if value is None else format(value, spec)


def _status_text(row: dict) -> str:
    if row["status"] == "ok":
        return "ok" if row["ran"] == "now" else "ok (finished earlier)"
    text = row["status"] + (f": {row['error']}" if row["error"] else "")
    return text.replace("|", "\\|")  # a pipe in an error message would split the Markdown cell


def format_table(rows: list[dict], best: list[dict]) -> str:
    """The sweep as Markdown: readable as plain text on stdout too."""
    lines = [
        "# LR x batch size sweep",
        "",
        f"Base LR is the LR at batch {BASE_BATCH} (`--base-lr`); each run scales it to its peak LR = "
        f"base LR x global batch / {BASE_BATCH} (linear scaling rule), as resolved in its recipe.json. "
        "Top-1 in percent on the validation set.",
        "",
        "| run | base LR | batch/GPU | global batch | peak LR | final top-1 | best top-1 | final val loss "
        "| epochs | img/s | wall s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        epochs = f"{r['epochs_run']}/{r['epochs']}" if r["epochs"] is not None else str(r["epochs_run"])
        lines.append(
            f"| {r['name']} | {r['base_lr']:g} | {r['batch_size']} | {r['global_batch']} | {_fmt(r['peak_lr'], '.4g')} "
            f"| {_fmt(r['final_val_top1'], '.2f')} | {_fmt(r['best_val_top1'], '.2f')} "
            f"| {_fmt(r['final_val_loss'], '.4f')} | {epochs} | {_fmt(r['img_per_s'], ',.1f')} "
            f"| {_fmt(r['wall_s'], '.1f')} | {_status_text(r)} |")
    lines += ["", "## Best base LR per batch size", "",
              "(highest best top-1; ties go to the lower final val loss)", "",
              "| batch/GPU | best base LR | peak LR | best top-1 | final val loss | run |",
              "|---|---|---|---|---|---|"]
    for b in best:
        if b["run"] is None:
            lines.append(f"| {b['batch_size']} | {NA} | {NA} | {NA} | {NA} | no finished run |")
        else:
            lines.append(f"| {b['batch_size']} | {b['base_lr']:g} | {_fmt(b['peak_lr'], '.4g')} "
                         f"| {b['best_val_top1']:.2f} | {_fmt(b['final_val_loss'], '.4f')} | {b['run']} |")
    return "\n".join(lines) + "\n"


def write_table(sweep_dir: Path, rows: list[dict], best: list[dict], meta: dict) -> str:
    """sweep.md and sweep.json; returns the Markdown (the caller prints it)."""
    text = format_table(rows, best)
    (sweep_dir / "sweep.md").write_text(text)
    (sweep_dir / "sweep.json").write_text(json.dumps({**meta, "runs": rows, "best_lr_per_batch": best},
                                                     indent=2) + "\n")
    return text


def plot_curves(rows: list[dict], path: Path) -> None:
    """Validation top-1 against epoch, one line per run: colour by LR, line style by batch size, so the
    grid reads at a glance. Runs with no finished epoch have no line (the table says why)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lrs = list(dict.fromkeys(r["base_lr"] for r in rows))
    sizes = list(dict.fromkeys(r["batch_size"] for r in rows))
    colours = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for r in rows:
        curve = r["val_top1_by_epoch"]
        if not curve:
            continue
        epochs, top1 = zip(*curve)
        ax.plot(epochs, top1, marker="o", markersize=3, color=colours(lrs.index(r["base_lr"]) % 10),
                linestyle=styles[sizes.index(r["batch_size"]) % len(styles)],
                label=GridPoint(r["base_lr"], r["batch_size"]).label + ("" if r["status"] == "ok" else " (failed)"))
        drawn += 1
    if drawn:
        ax.legend(fontsize="small", loc="best")
    else:
        ax.text(0.5, 0.5, "no run finished an epoch", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"LR x batch sweep (lr = base LR at batch {BASE_BATCH})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
