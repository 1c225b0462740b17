"""The harness's plots: throughput (each row's img/s with its rounds' spread) and the step timeline (each timed
step's compute and input wait), with the device's word for a process ("GPU", or "process" on the CPU)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def processes(report: dict, plural: bool = True) -> str:
    """What the figures are per: GPUs, or processes on a CPU run."""
    word = "GPU" if report["environment"].get("device_type") == "cuda" else "process"
    return word + ("es" if word == "process" else "s") if plural else word


def throughput_panels(results: list[dict]) -> list[tuple[str, list[dict]]]:
    """The training steps (the synthetic ceiling and end to end) in one panel and the loaders alone in
    another, each on its own axis: loader-only figures can be 100x the training ones."""
    panels = [("training step: synthetic ceiling and end to end", [r for r in results if r["mode"] != "loader"]),
              ("loaders alone (no model)", [r for r in results if r["mode"] == "loader"])]
    return [(title, rows) for title, rows in panels if rows]


def error_bar(r: dict) -> tuple[float, float]:
    """Below and above the mean: to the slowest and the fastest round's window (0 with a single one)."""
    windows = r.get("img_per_s_windows") or [r["img_per_s"]]
    return r["img_per_s"] - min(windows), max(windows) - r["img_per_s"]


def plot_throughput(report: dict, path: Path) -> None:
    _save(throughput_figure(report), path)


def plot_timeline(report: dict, path: Path) -> None:
    _save(timeline_figure(report), path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def throughput_figure(report: dict):
    colours = {"synthetic": "tab:grey", "loader": "tab:blue", "train": "tab:green"}
    panels = throughput_panels(report["results"])
    widths = [max(1, len(rows)) for _, rows in panels] or [1]
    fig, axes = plt.subplots(1, len(panels) or 1, figsize=(max(5, 1.4 * sum(widths) + 1.5), 4), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (title, rows) in zip(axes[0], panels):
        errors = [error_bar(r) for r in rows]
        bars = ax.bar([f"{r['mode']}\n{r['loader']}" for r in rows], [r["img_per_s"] for r in rows],
                      color=[colours[r["mode"]] for r in rows], yerr=list(zip(*errors)), capsize=4, ecolor="black")
        # each value above its error bar, with head room so that the tallest one's label stays inside the axes
        ax.bar_label(bars, labels=[f"{r['img_per_s']:,.0f}" for r in rows], padding=3, fontsize=8)
        ax.set_ylim(0, 1.18 * max(r["img_per_s"] + above for r, (_, above) in zip(rows, errors)))
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(f"images / s (all {processes(report)})")
    fig.suptitle(f"{report['config']['arch']} {report['config']['image_size']} px, "
                 f"batch {report['config']['global_batch']}; error bars: slowest to fastest round",
                 fontsize=10)
    return fig


def timeline_figure(report: dict):
    """Each timed step of each end-to-end window as a bar: the input wait (red) atop the rest."""
    runs = [r for r in report["results"] if r["mode"] != "loader"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 1.8 * len(runs) + 0.6), squeeze=False, sharex=True)
    for ax, r in zip(axes[:, 0], runs):
        step_ms = [s * 1e3 for s in r["timeline"]["step_s"]]
        wait_ms = [min(w * 1e3, s) for w, s in zip(r["timeline"]["wait_s"], step_ms)]
        x = range(1, len(step_ms) + 1)
        ax.bar(x, [s - w for s, w in zip(step_ms, wait_ms)], color="tab:green", label="compute")
        ax.bar(x, wait_ms, bottom=[s - w for s, w in zip(step_ms, wait_ms)], color="tab:red", label="input wait")
        ax.set_ylabel("ms")
        ax.set_ylim(0, 1.3 * max(step_ms))  # head room: the legend sits inside the axes, above the bars
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at step 2.5
        ax.set_title(f"{r['mode']} / {r['loader']}: stall {r['stall']['fraction']:.1%} ({r['stall']['basis']})",
                     fontsize=9)
    axes[0, 0].legend(loc="upper right", fontsize=8, ncols=2)
    axes[-1, 0].set_xlabel("timed step of the last round (rank 0)")
    return fig
