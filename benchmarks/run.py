"""Benchmark harness: `python -m benchmarks.run --data DIR --out DIR` (also under torchrun).

Measures, on the same data, batch, resolution and training step (rn50.core.step.train_step, the one training
uses):
  synthetic  the training step on a device-resident batch: the GPU ceiling
  loader     each input pipeline alone: the img/s it can deliver
  train      each input pipeline feeding the training step: end to end
and derives MFU, input stall, a bottleneck verdict per loader and the time a 90-epoch ImageNet run would
take. Writes report.json (schema in docs/benchmark-report.md), report.md and PNG plots into --out.

This module is the command: its flags, the door (`configure`: the configuration resolved once, before the
process group and the device exist; benchmarks/plan.py) and the run in order. The measurements are
benchmarks/measure.py's, the figures derived from them benchmarks/figures.py's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

# What reading the flags needs, and nothing heavier: `python -m benchmarks.run` reads them before the imports
# below parse_args load torch and DALI (seconds), so a mistyped flag is reported at once
from benchmarks import levers as levers_mod
from benchmarks.plan import (CPU_LOADERS, LOADERS, MODES, READ_MODE, WIDTH, BenchConfig, bench_config,
                             default_loaders)
from benchmarks.text import count
from pipelines.registry import REGISTRY
from pipelines.storage import display
from rn50.config.errors import UserError, check_flags_first
from rn50.config.profile_flags import add_profiling_flags
from rn50.config.recipe import resolve
from rn50.config.cli import add_recipe_flags, parse_strict


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="Every input is checked before the first measurement: a mistake "
                                            "costs seconds, not a benchmark.")
    parser.add_argument("--data", required=True, type=Path, help="folder with train/<class>/*.JPEG")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.json, report.md, plots")
    parser.add_argument("--modes", default=",".join(MODES), help="subset of synthetic,loader,train (default all)")
    parser.add_argument("--loaders", default=None,
                        help=f"subset of {','.join(LOADERS)}, or auto (dali on a GPU machine, dali-cpu without) "
                             f"(default: all on a GPU machine; {','.join(default_loaders(False))} without one, "
                             f"where {','.join(sorted(set(CPU_LOADERS) - set(default_loaders(False))))} runs "
                             "only when named: docs/loaders.md)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="excluded from timing (default 20 on a GPU, 3 on the CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per window (default 100 on a GPU, 6 on the CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds: each measures the ceiling and every loader once (its own warm-up and one "
                             "timed window), in an order that reverses each round; their spread is the noise "
                             "(default 3 on a GPU, 2 on the CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's peak dense fp16/bf16 TFLOP/s, overriding the built-in table "
                             "(default: the table's figure for the GPU found; none: no MFU)")
    parser.add_argument("--autotune", action="store_true",
                        help="sweep DALI threads, hw_decoder_load and prefetch in loader mode; save the best "
                             "(default off)")
    parser.add_argument("--levers", default=None, metavar="LEVER[,LEVER...]",
                        help="measure the baseline, each speed lever and the best combination (saved as "
                             f"OUT/levers.toml): {levers_mod.NAMES_HELP} (default none; docs/benchmarks.md#speed-levers)")
    parser.add_argument("--compare-data", type=Path, default=None, metavar="DATA",
                        help="read mode: the same data in the other form (shards beside folders, or S3 beside "
                             "local), read and compared")
    parser.add_argument("--training-runs", type=Path, nargs="*", default=[], metavar="RUN_DIR",
                        help="finished rn50.train run folders whose time-to-accuracy (--target-top1) the report "
                             "lists (default none)")
    add_profiling_flags(parser, "counted in each measurement from its first warm-up step; each measurement "
                                "writes its own trace")
    add_recipe_flags(parser)
    return parse_strict(parser, argv)


if __name__ == "__main__":
    check_flags_first(parse_args)

from benchmarks import autotune as autotuning  # noqa: E402
from benchmarks import read as read_mod  # noqa: E402
from benchmarks.figures import derive, flops_block, time_to_accuracy, time_to_train_schedule  # noqa: E402
from benchmarks.flops import flops_per_image, mfu  # noqa: E402
from benchmarks.measure import Bench, measure_resolutions, measure_rounds  # noqa: E402
from benchmarks.report import write_reports  # noqa: E402
from benchmarks.threads import apply_model_threads  # noqa: E402
from rn50.core.step import check_cuda_only_settings  # noqa: E402
from rn50.observe import tracking  # noqa: E402
from rn50.observe.profiling import check_flags, check_window  # noqa: E402
from rn50.system.device import choose_device  # noqa: E402
from rn50.system.dist import init_distributed, shutdown  # noqa: E402
from rn50.system.provenance import environment  # noqa: E402


def configure(flags: argparse.Namespace) -> BenchConfig:
    """The door: the harness's configuration, resolved once from the flags before the process group and the
    device exist (as rn50.train.configure). The device type its defaults depend on (the CPU sizes, the loaders
    this machine can run, the windows) comes from the policy the process group is then built with:
    rn50.system.device.choose_device over the machine's device as the flags and presets resolve it (a
    preset's [machine] device too; the defaults that depend on it never set it). Nothing below this function
    sees the flags."""
    device_type = choose_device(resolve(flags).machine.device).type
    return bench_config(flags, device_type)


def prepare_out(out: Path) -> None:
    """The report folder exists and takes files, before anything is measured."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise UserError(f"cannot write the report into {out} ({exc.strerror}); pass a writable folder as --out") from None


def run(config: BenchConfig, argv) -> dict:
    """The harness, top to bottom: checks, the main table in rounds, the report, the extras, the outputs."""
    # the training step's threads before any torch op, the same in every row (benchmarks/threads.py says why)
    apply_model_threads(config.threads)
    env = init_distributed(config.machine.device)  # the resolved machine's device: a preset's [machine] too
    accuracy_rows = check_before_measuring(config, env)
    bench = Bench(config.recipe, config.data, env, config.plan, config.machine, threads=config.threads)
    if config.profile_steps:
        bench.profile = (config.profile_steps, config.profiler, config.out)
    probe = bench.loader("synthetic")  # validates the data folder and gives its size
    say = print if env.is_main else (lambda *a, **k: None)
    say(headline(config, env), flush=True)
    results = measure_main_table(bench, config.plan, say)
    report = assemble_report(config, env, argv, probe, results, accuracy_rows, bench.traces)
    measure_extras(report, config, env, bench, probe, say)
    if env.is_main:
        write_reports(report, config.out)
        announce(report, config.out)
        tracking.log_bench(config.machine, config.out, report)  # --tracker: the figures, the report and plots
    return report


def check_before_measuring(config: BenchConfig, env) -> list[dict]:
    """Every input checked before the first measurement, which may take many minutes: a mistake is one line,
    not a lost benchmark. Returns the time-to-accuracy rows of --training-runs (read now, for the same reason)."""
    plan, recipe, machine = config.plan, config.recipe, config.machine
    check_cuda_only_settings(recipe, machine, env.device)
    check_flags(config.profile_steps, config.profiler, env.device)
    tracking.check_available(machine.tracker)  # a missing extra is a start-up error, not a lost benchmark
    measurement_steps = plan.warmup_steps + 1 + plan.steps  # a round's measurement of one row
    check_window(config.profile_steps, measurement_steps,
                 f"each round's measurement ({count(plan.warmup_steps, 'warm-up step')} + 1 untimed + "
                 f"{plan.steps} timed)")
    needs_cuda = [name for name in plan.loaders if REGISTRY[name].needs_cuda]
    if env.device.type != "cuda" and needs_cuda:
        raise UserError(f"{' and '.join(needs_cuda)} need{'s' if len(needs_cuda) == 1 else ''} a CUDA GPU; "
                        f"benchmark --loaders {','.join(CPU_LOADERS)} here")
    accuracy_rows = time_to_accuracy(config.training_runs)
    if config.compare_data is not None:
        read_mod.check_source(config.compare_data)  # listed now: a wrong path is one line
    prepare_out(config.out)
    return accuracy_rows


def headline(config: BenchConfig, env) -> str:
    """The console's first line: what is measured, how, on what, with which threads."""
    plan, recipe, threads = config.plan, config.recipe, config.threads
    return (f"benchmarking {recipe.model.arch} at {recipe.augmentation.image_size} px, batch "
            f"{recipe.optimisation.batch_size} x {env.world_size} on {env.device}: modes {','.join(plan.modes)}; "
            f"loaders {','.join(plan.loaders) or 'none'}; {count(plan.repeats, 'round')}, each row in each: "
            f"{plan.warmup_steps} warm-up + {count(plan.steps, 'timed step')}; threads: {threads.model_threads} "
            f"for the step, {threads.loader_threads} for the loader, of {threads.cores} cores")


def measure_main_table(bench: Bench, plan, say) -> list[dict]:
    """The ceiling and every loader alone and end to end, in rounds (benchmarks.measure.measure_rounds)."""
    jobs = [("synthetic", "synthetic")] if "synthetic" in plan.modes else []
    jobs += [(mode, name) for name in plan.loaders for mode in ("loader", "train") if mode in plan.modes]
    results = measure_rounds(bench, jobs, plan.repeats, say)
    for result in results:
        say(f"  {result['mode']:9s} {result['loader']:{WIDTH}s} {result['img_per_s']:10.1f} img/s"
            + (f" +- {result['img_per_s_spread']:.0%}" if result["img_per_s_spread"] is not None else "")
            + (f"  stall {result['stall']['fraction']:.1%} ({result['stall']['basis']})" if result["stall"] else ""),
            flush=True)
    return results


def assemble_report(config: BenchConfig, env, argv, probe, results: list[dict], accuracy_rows: list[dict],
                    traces: list[dict]) -> dict:
    """report.json's main body (docs/benchmark-report.md): provenance, configuration, the rows and what they
    derive; the extras' keys start empty (measure_extras)."""
    plan, recipe, machine = config.plan, config.recipe, config.machine
    batch = recipe.optimisation.batch_size
    flops = flops_block(recipe, probe.num_classes, config.peak_tflops)
    return {
        "schema": "rn50-bench/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {**environment(), "world_size": env.world_size, "device_type": env.device.type,
                        "command": " ".join(["python -m benchmarks.run", *argv]),
                        "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "python"},
        "config": {"arch": recipe.model.arch, "batch_size": batch, "image_size": recipe.augmentation.image_size,
                   "global_batch": batch * env.world_size, "modes": list(plan.modes),
                   "loaders": list(plan.loaders), "left_out": dict(plan.left_out),  # the default set's, and why
                   "warmup_steps": plan.warmup_steps, "timed_steps": plan.steps,
                   "repeats": plan.repeats, "dataset": {"path": display(config.data),
                                                        "train_images": probe.num_samples,
                                                        "classes": probe.num_classes},
                   # the machine's own `loader` setting is not used here: --loaders names the loaders
                   "recipe": recipe.to_dict(), "machine": {k: v for k, v in machine.to_dict().items() if k != "loader"}},
        "threads": config.threads.to_dict(),
        "flops": flops,
        "results": results,
        **derive(results, plan, env, flops, env.device.type),
        "scaling": None,
        "autotune": None,
        "levers": None,
        "time_to_train_schedule": None,
        "time_to_accuracy": accuracy_rows,
        # the --profile-steps window; B <= warm-up keeps the profiler's cost (and the trace's export) out of
        # the timed windows
        "profile": {"steps": f"{config.profile_steps[0]}:{config.profile_steps[1]}", "tool": config.profiler,
                    "in_warm_up": config.profile_steps[1] <= plan.warmup_steps, "traces": traces}
        if config.profile_steps else None,
    }


def measure_extras(report: dict, config: BenchConfig, env, bench: Bench, probe, say) -> None:
    """What is measured after the main table, each when asked for, into its report key: the scaling against one
    GPU, the recipe's other resolutions, the DALI settings sweep, the speed levers, the raw reads."""
    plan, recipe, machine, out, results = config.plan, config.recipe, config.machine, config.out, report["results"]
    if env.distributed and "synthetic" in plan.modes:
        single = bench.single_gpu_ceiling()
        if env.is_main and single:
            aggregate = next(r for r in results if r["mode"] == "synthetic")["img_per_s"]
            report["scaling"] = {"single_gpu_img_per_s": single, "aggregate_img_per_s": aggregate,
                                 "world_size": env.world_size, "efficiency": aggregate / (env.world_size * single)}
    if recipe.augmentation.max_res and {"synthetic", "train"} & set(plan.modes):
        rows = measure_resolutions(bench, plan, results, say)
        report["time_to_train_schedule"] = time_to_train_schedule(recipe, rows)
    if config.autotune:
        report["autotune"] = autotuning.sweep(bench, plan, out if env.is_main else None)
    if plan.levers:
        def mfu_of(lever_recipe):
            per_image = flops_per_image(lever_recipe.model.arch, lever_recipe.augmentation.image_size,
                                        probe.num_classes, blurpool=lever_recipe.model.blurpool)
            return lambda img_per_s_per_gpu: mfu(img_per_s_per_gpu, per_image, report["flops"]["peak_tflops"])

        report["levers"] = levers_mod.measure_levers(bench, list(plan.levers), plan.modes,
                                                     plan.loaders[0] if plan.loaders else None, mfu_of, results)
        if env.is_main and report["levers"]["best_fields"]:
            # training's own start-up checks, once more on exactly what is written: a preset it would refuse
            # is never saved
            levers_mod.check_preset(report["levers"]["best_fields"], recipe, machine, env.device)
            report["levers"]["preset"] = str(out / "levers.toml")
            levers_mod.write_preset(report["levers"]["best_fields"], out / "levers.toml")
    if READ_MODE in plan.modes:  # after the loader and train rows, which its verdict weighs
        report["read"] = read_mod.section(config.data, config.compare_data, results, env, recipe.seed,
                                          max(8, machine.workers), say)


def announce(report: dict, out: Path) -> None:
    """The console's last lines: the ratios, each verdict with its evidence, where the report is."""
    for pair, modes in report["ratios"].items():
        for mode, value in modes.items():
            print(f"{pair} {mode}-mode ratio: {value:.2f}x", flush=True)
    for name, v in report["verdicts"].items():
        print(f"verdict for {name}: {v['verdict']} ({'; '.join(v['evidence'])})", flush=True)
    print(f"wrote {out / 'report.json'}, report.md and plots", flush=True)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(configure(parse_args(argv)), argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
