"""The harness's outputs: report.json, report.md (tables) and PNG plots (throughput, step timeline)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.plots import plot_throughput, plot_timeline, processes
from benchmarks.text import NA, count as _count, num as _num, pct as _pct



def markdown(report: dict) -> str:
    env, config, flops = report["environment"], report["config"], report["flops"]
    lines = [
        "# Benchmark report",
        "",
        f"{config['arch']} at {config['image_size']} px, batch {config['batch_size']} per {processes(report, False)} "
        f"x {env['world_size']} = {config['global_batch']}; {_count(config['repeats'], 'round')}, each measuring "
        f"every row once in an order that reverses each round: {_count(config['warmup_steps'], 'warm-up step')} "
        f"excluded, then {_count(config['timed_steps'], 'timed step')}. Created {report['created']}.",
        "",
        *load_lines(report.get("load")),
        *thread_lines(report.get("threads")),
        "## Throughput",
        "",
        f"| mode | loader | img/s (all {processes(report)}) | img/s per {processes(report, False)} | std | "
        "step mean / p50 / p95 (ms) | stall | MFU | machine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        step = r["step_time"]
        stall = NA if r["stall"] is None else f"{_pct(r['stall']['fraction'])} ({r['stall']['basis']})"
        lines.append(
            f"| {r['mode']} | {r['loader']} | {_num(r['img_per_s'])} | {_num(r['img_per_s_per_gpu'])} | "
            f"{_num(r['img_per_s_std'])} | {step['mean_s'] * 1e3:.1f} / {step['p50_s'] * 1e3:.1f} / "
            f"{step['p95_s'] * 1e3:.1f} | {stall} | {_pct(r['mfu'])} | {_load_word(r.get('load'))} |"
        )
    decode = {r["loader"]: r["decode"] for r in report["results"] if r.get("decode")}
    lines += ["", "Decode path measured: " + "; ".join(f"{name}: {text}" for name, text in decode.items()) + "."]
    for name, why in config.get("left_out", {}).items():  # the default set's exclusions on this machine
        lines += ["", f"Not measured by default here: {name}, {why}; `--loaders {name}` measures it."]
    lines += ["", f"MFU: {flops['per_image_train'] / 1e9:.2f} GFLOPs per image (forward+backward, "
              f"{flops['counted_with']}) over a peak of {_num(flops['peak_tflops'], '{:g}')} TFLOP/s "
              f"({flops['peak_source']}).", ""]
    lines += loader_choice(report)
    if report["ratios"]:
        lines += ["## Loader ratios", ""]
        for pair, modes in report["ratios"].items():
            lines += [f"- {pair}: " + ", ".join(f"{mode} mode {value:.2f}x" for mode, value in modes.items())]
        lines.append("")
    lines += ["## Verdicts", ""]
    for name, v in report["verdicts"].items():
        lines += [f"### {name}: {v['verdict']}", ""] + [f"- {e}" for e in v["evidence"]]
        if v["next_steps"]:
            lines += ["", "Next steps:"] + [f"1. {step}" for step in v["next_steps"]]
        lines.append("")
    lines += storage_section(report.get("read"))
    if report["time_to_train_90_epochs"]:
        lines += ["## A 90-epoch ImageNet run at these speeds", "",
                  "| loader | training h | validation h (estimated) | total h |", "|---|---|---|---|"]
        for name, t in report["time_to_train_90_epochs"].items():
            lines.append(f"| {name} | {t['train_hours']:.1f} | {t['validation_hours_estimated']:.1f} | "
                         f"{t['total_hours']:.1f} |")
        lines += ["", f"At the measured throughput, so at {config['image_size']} px and batch {config['global_batch']}; "
                  "1,281,167 training and 50,000 validation images per epoch; validation assumed 3x faster "
                  "than training (forward pass only).", ""]
    if report.get("time_to_train_schedule"):
        schedule = report["time_to_train_schedule"]
        lines += ["## This recipe's schedule on ImageNet (progressive resizing)", "",
                  "| loader | img/s at each training resolution | epochs per resolution | training h | "
                  "validation h (estimated) | total h |", "|---|---|---|---|---|---|"]
        for loader, t in schedule["estimates"].items():
            speeds = ", ".join(f"{r['image_size']} px: {r['img_per_s']:,.1f}" for r in schedule["per_resolution"]
                               if r["loader"] == loader)
            per = ", ".join(f"{size} px x {n}" for size, n in t["epochs_per_resolution"].items())
            lines.append(f"| {loader} | {speeds} | {per} | {t['train_hours']:.2f} | "
                         f"{t['validation_hours_estimated']:.2f} | {t['total_hours']:.2f} |")
        lines += ["", "Each epoch at the img/s measured at its resolution (1,281,167 images); validation "
                  "estimated from the first resolution's speed, scaled by pixels and by 2 with flip averaging.", ""]
    if report.get("time_to_accuracy"):
        lines += ["## Time to accuracy (training runs)", "",
                  "| run | target top-1 | reached | wall time | epochs | best top-1 | img/s | GPUs |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in report["time_to_accuracy"]:
            lines.append(f"| {t['run']} | {_num(t['target_top1'], '{:g}%')} | {'yes' if t['reached'] else 'no'} | "
                         f"{_num(t['time_s'], '{:,.0f} s')} | {_num(t['epochs'], '{:g}')} | "
                         f"{_num(t['best_top1'], '{:.2f}%')} | {_num(t['img_per_s'])} | {t['world_size']} |")
        lines.append("")
    if report["scaling"]:
        s = report["scaling"]
        lines += ["## Scaling", "", f"Synthetic data: {s['aggregate_img_per_s']:,.1f} img/s on {s['world_size']} "
                  f"GPUs vs {s['single_gpu_img_per_s']:,.1f} on one: {s['efficiency']:.1%} efficiency.", ""]
    if report["autotune"]:
        lines += ["## Autotune (loader mode)", ""]
        setting = lambda row: ", ".join(f"{k} {v}" for k, v in row.items()  # noqa: E731
                                        if k not in ("img_per_s", "img_per_s_windows", "given"))
        for name, tuned in report["autotune"]["loaders"].items():
            against = tuned["best_vs_given"]
            noise = f"noise {against['noise']:.0%}" if against["noise"] is not None else \
                "the noise unknown with one window: measure with --repeats 2 or more"
            lines.append(f"- {name}: best {setting(tuned['best'])}, {_num(tuned['best']['img_per_s'])} img/s, "
                         f"{against['ratio']:.2f}x the given setting ({setting(tuned['given'])}): "
                         f"{against['word']} ({noise})")
        if report["autotune"]["preset"]:
            lines.append(f"- saved as `{report['autotune']['preset']}` (use with `--preset`)")
        else:
            lines.append("- no preset written: no setting beat the given one beyond the noise")
        lines.append("")
    if report.get("levers"):
        lines += levers_table(report["levers"])
    telemetry = [(r, r["telemetry"]) for r in report["results"]]
    lines += ["## GPU telemetry (NVML, rank 0)", ""]
    if any(t["available"] for _, t in telemetry):
        lines += ["| mode | loader | GPU util | SM MHz | power W | memory mean GiB | memory peak GiB (device) | "
                  "memory peak GiB (torch) | PCIe RX MB/s | J per image |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r, t in telemetry:
            if t["available"]:
                lines.append(f"| {r['mode']} | {r['loader']} | {_num(t['gpu_util_pct'], '{:.0f}%')} | "
                             f"{_num(t['sm_clock_mhz'], '{:.0f}')} | {_num(t['power_w'])} | "
                             f"{_num(t['memory_used_gib'])} | {_num(r['memory_device_peak_gib'], '{:.2f}')} | "
                             f"{_num(r['memory_peak_gib'], '{:.2f}')} | {_num(t['pcie_rx_mb_s'])} | "
                             f"{_num(t['energy_j_per_image'], '{:.3f}')} |")
        lines += ["", "Memory peak (device): NVML's, everything on the GPU (DALI's pools, which hand batches to torch "
                  "without a copy, torch's cache, the CUDA context, other processes). Memory peak (torch): "
                  "torch.cuda.max_memory_allocated, its allocator's tensors only."]
    else:
        lines.append(f"Not available: {telemetry[0][1]['reason'] if telemetry else 'nothing measured'}.")
    if report.get("profile"):
        lines += [""] + profile_section(report["profile"])
    lines += ["", "## Environment", ""] + [f"- {key}: {value}" for key, value in env.items()]
    lines += [f"- dataset: {config['dataset']['path']} ({config['dataset']['train_images']} training images, "
              f"{_count(config['dataset']['classes'], 'class', 'classes')})", ""]
    return "\n".join(lines)


def storage_section(read: dict | None) -> list[str]:
    """The `read` mode (benchmarks/read.py): raw reads from each source beside the loaders, and whether the
    storage, the decode or the model is the limit."""
    if not read:
        return []
    lines = ["## Is the storage the bottleneck? (read mode)", "",
             "| source | kind | images read | img/s | MiB/s |", "|---|---|---|---|---|"]
    for row in read["sources"]:
        lines.append(f"| {row['source']} | {row['kind']} | {row['images']:,} | {_num(row['img_per_s'])} | "
                     f"{_num(row['bytes_per_s'] / 2**20)} |")
    if "ratio" in read:
        first, second = read["sources"][0]["kind"], read["sources"][1]["kind"]
        lines += ["", f"{second} reads at {read['ratio']:.2f}x the rate of {first}."]
    if read["verdicts"]:
        lines += ["", "| loader | verdict | reads img/s | loader img/s | train img/s |", "|---|---|---|---|---|"]
        for name, v in read["verdicts"].items():
            lines.append(f"| {name} | {v['verdict']} | {_num(v['read_img_per_s'])} | "
                         f"{_num(v['loader_img_per_s'])} | {_num(v['train_img_per_s'])} |")
    return lines + [""]


def load_lines(load: dict | None) -> list[str]:
    """The report's first word on the machine: busy (what ran beside the job, in which rows) or quiet, or what
    could not be measured."""
    if not load:
        return []
    if load["busy"]:
        return ([f"**Busy machine: other work ran beside this benchmark** (rows: {', '.join(load['busy_rows'])}). "
                 "Their figures are not this machine's alone, and every verdict and choice drawn from them is of "
                 "low confidence:", ""] + [f"- {line}" for line in load["why"]] + [""])
    if not load["cpu_measured"]:
        return [f"Machine load: not measured ({'; '.join(load['not_measured'])}).", ""]
    gpu = "" if load["gpu_measured"] else " (the GPU's other processes and clocks not measured: " \
        + "; ".join(load["not_measured"]) + ")"
    return [f"Machine load: quiet, no other work measured beside this benchmark in any window{gpu}.", ""]


def thread_lines(threads: dict | None) -> list[str]:
    """The thread budget every row ran under (benchmarks/threads.py)."""
    if not threads:
        return []
    return [f"Threads: the training step on {_count(threads['model'], 'torch thread')}, the loaders on "
            f"{threads['loader']}, of {_count(threads['cores'], 'core')}: {threads['why']}.", ""]


def _load_word(load: dict | None) -> str:
    """A row's machine during its windows: busy, quiet, or not measured."""
    if not load or not load.get("available"):
        return NA
    return "busy" if load["busy"] else "quiet"


def loader_choice(report: dict) -> list[str]:
    """The answer drawn from the figures, then each loader against DALI."""
    lines = []
    if report.get("recommendation"):
        lines += ["## Which loader should I use here", "", report["recommendation"]["text"], ""]
    to_dali = report.get("ratios_to_dali")
    if to_dali and to_dali["loaders"]:
        lines += [f"## Each loader against {to_dali['reference']}", "",
                  f"| loader | loader mode (x {to_dali['reference']}) | end to end (x {to_dali['reference']}) |",
                  "|---|---|---|"]
        for name, pair in to_dali["loaders"].items():
            lines.append(f"| {name} | {_num(pair.get('loader'), '{:.2f}x')} | {_num(pair.get('train'), '{:.2f}x')} |")
        lines.append("")
    return lines


def profile_section(profile: dict) -> list[str]:
    """Links to the --profile-steps traces (paths relative to report.md), one line per measurement."""
    first, last = profile["steps"].split(":")
    lines = ["## Profiler traces", "", f"Steps {first} to {last} of each measurement (counted from its first warm-up "
             f"step), recorded by {profile['tool']}; how to read them: docs/profiling.md."]
    if profile["tool"] == "nsys":
        lines.append("They are in the capture range of the enclosing `nsys profile` run (its `-o` file), not here.")
    else:
        lines[-1] += " Open a trace in ui.perfetto.dev, or `tensorboard --logdir profile` (torch-tb-profiler)."
    if not profile["in_warm_up"]:
        lines.append("The window reaches past the warm-up: those measurements' timed figures include the "
                     "profiler's cost.")
    lines.append("")
    by_measurement: dict[tuple, list[dict]] = {}
    for trace in profile["traces"]:
        by_measurement.setdefault((trace["mode"], trace["loader"]), []).append(trace)
    for (mode, loader), traces in by_measurement.items():
        lines.append(f"- {mode} / {loader}: " + ", ".join(f"[rank {t['rank']}]({t['path']})" for t in traces))
    return lines


def levers_table(levers: dict) -> list[str]:
    """One row per lever: measured on or off against the baseline, or why it was not measured here."""
    ranked = "end to end" if levers["ranked_by"] == "end_to_end" else "synthetic"
    lines = ["## Speed levers", "",
             f"Each lever against the baseline (x baseline: {ranked} img/s"
             + (f", loader {levers['loader']}" if levers.get("loader") else "") + "). A lever already on in the "
             "baseline is measured switched off, so its row shows what it is worth.", "",
             "| lever | measured | synthetic img/s | end-to-end img/s | x baseline | % of synthetic | MFU | "
             "peak memory GiB (torch) | in the best combination | why it is faster |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in levers["rows"]:
        if not row["measured"]:
            lines.append(f"| {row['lever']} | not measured: {row['reason']} | | | | | | | | {row['why']} |")
            continue
        joined = "yes" if row.get("joined") else (f"no: {row['left_out']}" if row.get("left_out") else "")
        synthetic, e2e = row.get("synthetic") or {}, row.get("end_to_end") or {}
        best = e2e or synthetic
        lines.append(f"| {row['lever']} | {row['state']} | {_num(synthetic.get('img_per_s'))} | "
                     f"{_num(e2e.get('img_per_s'))} | {_num(row.get('ratio_to_baseline'), '{:.2f}x')} | "
                     f"{_pct(e2e.get('of_synthetic'))} | {_pct(best.get('mfu'))} | "
                     f"{_num(best.get('memory_peak_gib'), '{:.2f}')} | {joined} | {row['why']} |")
    if levers.get("preset"):
        lines += ["", f"Best combination saved as `{levers['preset']}` (use with `--preset`)."]
    elif levers.get("not_written"):
        lines += ["", f"No preset written: {levers['not_written']}."]
    elif levers.get("rows") and not levers.get("candidate_fields"):
        lines += ["", "No preset written: no lever was faster than the baseline beyond the noise (with one "
                      "window per measurement the noise is unknown: measure with --repeats 2 or more)."]
    return lines + [""]


def write_reports(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    plot_throughput(report, out / "throughput.png")
    if any(r["mode"] != "loader" for r in report["results"]):
        plot_timeline(report, out / "timeline.png")
