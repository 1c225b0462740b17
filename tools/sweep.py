"""Sweep base LR x per-GPU batch size with ordinary training runs, then compare them in one table and one plot.

    python -m tools.sweep --data DIR --out SWEEP_DIR --lrs 0.05,0.1,0.2 --batch-sizes 32,64 \\
        [--nproc-per-node N] [-- extra rn50.train flags ...]

Each grid point is a normal `rn50.train` run (through torchrun when N > 1) into `SWEEP_DIR/lr<lr>_bs<bs>/`,
one after another. The LR values are BASE LRs (`--base-lr`: the LR at batch 256, `base_batch`); every run
scales its own to the peak LR = base LR x global batch / 256 (the linear scaling rule), and the table shows
that resolved peak LR as the run saved it (recipe.json "peak_lr").

- Before the first run, what would fail every run at start-up is checked once (`check_runs`): the flags
  after `--` (rn50.train's parser), the dataset layout (folders or shards listed, no image opened), each grid
  point's recipe, the architectures, weight files and the device the loader needs. One `error:` line, exit 2.
- A run that fails is recorded as failed, with the last line it wrote to stderr, and the sweep goes on.
- A run's stderr is echoed, except rn50.train's "run the same command with --resume auto" advice after a
  stop signal (the sweep refuses --resume after `--`; its own last line says how to continue) and torchrun's
  traceback when it was signalled (its report of the signal, not a crash): each becomes one true line.
- A finished run (summary.json present) is skipped, so running the same command again resumes the sweep;
  an unfinished one (metrics.jsonl but no summary.json) continues from its newest checkpoint.
- With `-- --tracker wandb|mlflow`, every run is a tracker run of its own, grouped under the sweep folder's
  name (`--tracker-group`: the W&B group, MLflow's tag `rn50.group`) unless the flags name another group.
- Outputs: `SWEEP_DIR/sweep.md` and `sweep.json` (one row per run: base LR, batch, global batch, peak LR,
  final and best val top-1, final val loss, epochs, img/s, wall s, status; and the best base LR per batch
  size: highest best top-1, ties to the lower final val loss, then to the lower LR), the same table on
  stdout, and `SWEEP_DIR/sweep.png` (validation top-1 against epoch, one line per run).

This module is the command and the loop over the grid; the grid and the checks before the first run are
tools/sweep_grid.py's, one run (its command, stderr and signals) tools/sweep_launch.py's, the rows, table and
plot tools/sweep_results.py's.

Exit codes: 0 every run finished, 1 some run failed (the table says which and why), 2 a user error (one
line says what to fix), 75 stopped by SIGTERM/SIGUSR1 (forwarded to the run, which saves a checkpoint) and
130 Ctrl-C: run the same command again to continue.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rn50.config.errors import UserError
from rn50.reliability.exits import EXIT_INTERRUPTED, EXIT_PREEMPTED
from tools.sweep_grid import BASE_BATCH, check_runs, parse_grid, with_tracker_group
from tools.sweep_launch import Forwarder, run_one, train_command
from tools.sweep_results import best_per_batch, collect_result, plot_curves, write_table

EXIT_SOME_FAILED = 1


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UserError (one `error:` line, exit 2), as everywhere else."""

    def error(self, message):
        raise UserError(message)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the rn50.train flags after `--`."""
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = _Parser(prog="python -m tools.sweep", description=__doc__.split("\n")[0], allow_abbrev=False,
                epilog="Flags after -- go to every rn50.train run (e.g. -- --epochs 30 --loader dali).")
    p.add_argument("--data", required=True, type=Path, help="folder with train/<class>/ and val/<class>/")
    p.add_argument("--out", required=True, type=Path, help="sweep folder: one run folder per grid point, "
                                                          "sweep.md, sweep.json, sweep.png")
    p.add_argument("--lrs", required=True,
                   help=f"comma-separated BASE LRs, the LR at batch {BASE_BATCH} (rn50.train --base-lr); each "
                        f"run scales it to base LR x global batch / {BASE_BATCH} (linear scaling rule)")
    p.add_argument("--batch-sizes", required=True, help="comma-separated batch sizes per GPU (--batch-size)")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="processes (GPUs) per run; above 1 each run goes through torchrun (default 1)")
    args, unknown = p.parse_known_args(own)
    if unknown:
        raise UserError(f"unknown argument {unknown[0]!r}; flags for rn50.train go after `--`")
    if args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    return args, extra


def run_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    """Run every grid point not yet finished, then write the table and the plot. Returns the exit code."""
    grid = parse_grid(args.lrs, args.batch_sizes)
    if not args.data.is_dir():
        raise UserError(f"--data {args.data} is not a folder; pass the dataset folder with train/ and val/")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; pass a folder for the sweep")
    check_runs(grid, extra, args.data, args.out)
    extra = with_tracker_group(extra, args.data, args.out)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the sweep folder {args.out} ({exc.strerror}); pass a writable --out") from None

    rows, stop_code = [], 0
    forwarder = Forwarder()
    try:
        for i, point in enumerate(grid, start=1):
            run_dir = args.out / point.name
            head = f"[{i}/{len(grid)}] {point.label}"
            if stop_code:  # stopped by a signal: the rest stays for the next invocation
                rows.append(collect_result(point, run_dir, args.nproc_per_node, "not run", None, "no"))
                continue
            if (run_dir / "summary.json").is_file():
                print(f"{head}: skipped, finished earlier in {run_dir} (delete that folder to run it again)",
                      flush=True)
                rows.append(collect_result(point, run_dir, args.nproc_per_node, "ok", None, "earlier"))
                continue
            # metrics.jsonl without summary.json: an earlier attempt stopped part way; rn50.train refuses to
            # start over in that folder, but continues it from its newest checkpoint (or from scratch)
            resume = (run_dir / "metrics.jsonl").is_file()
            command = train_command(point, args.data, run_dir, args.nproc_per_node, extra, resume)
            print(f"{head}: {'resuming the unfinished run' if resume else 'training'} in {run_dir}\n"
                  f"  {' '.join(command)}", flush=True)
            started = time.perf_counter()
            try:
                code, error = run_one(command, forwarder)
            except KeyboardInterrupt:
                code, error, stop_code = EXIT_INTERRUPTED, "interrupted (Ctrl-C)", EXIT_INTERRUPTED
            if code == EXIT_PREEMPTED or forwarder.received:
                stop_code = stop_code or EXIT_PREEMPTED
            status = "ok" if code == 0 and (run_dir / "summary.json").is_file() else (
                "interrupted" if stop_code else "failed")
            if code == 0 and status != "ok":
                error = "exit code 0 but no summary.json"
            rows.append(collect_result(point, run_dir, args.nproc_per_node, status, error, "now"))
            print(f"{head}: {status}{f' ({error})' if error else ''} after {time.perf_counter() - started:.1f} s",
                  flush=True)
    finally:
        forwarder.close()

    best = best_per_batch(rows)
    meta = {"data": str(args.data.resolve()), "nproc_per_node": args.nproc_per_node, "extra_flags": extra,
            "base_batch_note": f"base_lr is the LR at batch {BASE_BATCH}; peak_lr as each run resolved it"}
    text = write_table(args.out, rows, best, meta)
    plot_curves(rows, args.out / "sweep.png")
    print("\n" + text + f"\ntable: {args.out / 'sweep.md'} and {args.out / 'sweep.json'}; "
          f"plot: {args.out / 'sweep.png'}", flush=True)
    if stop_code:
        print(f"sweep stopped ({'Ctrl-C' if stop_code == EXIT_INTERRUPTED else forwarder.received or 'preempted'});"
              " run the same command to continue it", file=sys.stderr, flush=True)
        return stop_code
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} of {len(rows)} runs failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        return EXIT_SOME_FAILED
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        code = run_sweep(*parse_args(sys.argv[1:] if argv is None else list(argv)))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
