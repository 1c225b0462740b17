"""Sweep base LR x per-GPU batch size with ordinary training runs, then compare them in one table and one plot.

    python -m tools.sweep --data DIR --out SWEEP_DIR --lrs 0.05,0.1,0.2 --batch-sizes 32,64 \\
        [--nproc-per-node N] [-- extra rn50.train flags ...]

Each grid point is a normal `rn50.train` run (through torchrun when N > 1) into `SWEEP_DIR/lr<lr>_bs<bs>/`,
one after another. The LR values are BASE LRs (`--base-lr`: the LR at batch 256, `base_batch`); every run
scales its own to the peak LR = base LR x global batch / 256 (the linear scaling rule), and the table shows
that resolved peak LR as the run saved it (recipe.json "peak_lr").

- Before the first run, what would fail every run at start-up is checked once (`check_runs`): the flags
  after `--` (rn50.train's parser), the dataset layout (folders listed, no image opened), each grid point's
  recipe, the architectures, weight files and the device the loader needs. One `error:` line, exit 2.
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

Exit codes: 0 every run finished, 1 some run failed (the table says which and why), 2 a user error (one
line says what to fix), 75 stopped by SIGTERM/SIGUSR1 (forwarded to the run, which saves a checkpoint) and
130 Ctrl-C: run the same command again to continue.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import math
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rn50.config.errors import UserError

EXIT_SOME_FAILED = 1
EXIT_PREEMPTED = 75  # as rn50.train: "a temporary failure, run the same command again"
EXIT_INTERRUPTED = 130
BASE_BATCH = 256  # the recipe's default base_batch; only quoted in help, each run resolves its own
# rn50.train flags the sweep sets itself: given again after `--` they would silently fight the grid
MANAGED_FLAGS = {"--data": "--data", "--out": "--out", "--base-lr": "--lrs", "--batch-size": "--batch-sizes",
                 "--resume": "(the sweep resumes unfinished runs itself)"}
NA = "-"


@dataclass(frozen=True)
class GridPoint:
    base_lr: float
    batch_size: int  # per GPU (per process), as rn50.train's --batch-size

    @property
    def name(self) -> str:
        # `:g` keeps folder names short and stable: 0.1 and 0.10 are the same run
        return f"lr{self.base_lr:g}_bs{self.batch_size}"

    @property
    def label(self) -> str:
        return f"lr={self.base_lr:g} bs={self.batch_size}"


# ---- the grid ----

def parse_values(text: str, flag: str, kind: type) -> list:
    """Comma-separated numbers of `kind` (float or int), all positive; duplicates dropped, order kept."""
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            value = float(item) if kind is float else int(item)
        except ValueError:
            what = "a number" if kind is float else "a whole number"
            raise UserError(f"{flag}: {item!r} is not {what}; give comma-separated values such as "
                            f"{'0.05,0.1,0.2' if kind is float else '32,64'}") from None
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag}: {item!r} must be a positive number")
        if value not in values:
            values.append(value)
    if not values:
        raise UserError(f"{flag} is empty; give comma-separated values such as "
                        f"{'0.05,0.1,0.2' if kind is float else '32,64'}")
    return values


def parse_grid(lrs: str, batch_sizes: str) -> list[GridPoint]:
    """The grid in run order: batch sizes outer, LRs inner, so each batch size's LRs sit together."""
    lr_values = parse_values(lrs, "--lrs", float)
    bs_values = parse_values(batch_sizes, "--batch-sizes", int)
    return [GridPoint(lr, bs) for bs in bs_values for lr in lr_values]


def check_data(data: Path, manifest: Path | None) -> None:
    """The dataset layout every run lists first, checked once with rn50.train's own listing (its messages):
    train/ with class folders that hold images, val/ with classes that training has; with --manifest, its
    train.txt and val.txt. No image is opened (the header check stays with each run)."""
    from pipelines.folder import SPLITS, list_split

    for split in SPLITS:
        list_split(str(data), split, None if manifest is None else str(manifest))


def parse_run_flags(extra: list[str], data: Path, out: Path) -> argparse.Namespace:
    """rn50.train's own parser on the flags after `--`, with the sweep's managed flags refused first."""
    for token in extra:
        flag = token.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            raise UserError(f"{flag} after -- is set by the sweep ({MANAGED_FLAGS[flag]}); remove it")
    from rn50.train import parse_args  # imports torch: only once the cheap checks have passed

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # an argparse error prints usage and exits; keep its reason
            return parse_args(["--data", str(data), "--out", str(out), *extra])
    except UserError as err:  # an unknown flag, or (newer parsers) a value of the wrong type
        raise UserError(f"bad rn50.train flag after --: {err}") from None
    except SystemExit as stop:
        if stop.code in (0, None):  # `-- --help`: rn50.train's help is printed; nothing more to do
            raise
        reason = captured.getvalue().strip().splitlines()[-1:] or ["invalid flags"]
        raise UserError(f"bad rn50.train flag after --: {reason[0].split('error: ', 1)[-1]}") from None


def check_runs(grid: list[GridPoint], extra: list[str], data: Path, out: Path) -> None:
    """Everything that would make every run of the grid fail at start-up, checked once before the first:
    the flags after `--`, the dataset layout, each grid point's recipe, the architectures, weight files and
    the device the loader needs. A typo would otherwise fail every run, one start-up at a time."""
    args = parse_run_flags(extra, data, out / grid[0].name)
    check_data(data, args.manifest)
    from pipelines import check_device
    from rn50.system.device import choose_device
    from rn50.config.recipe import resolve

    resolved = resolve(args)  # a preset name or a field value that rn50.train would refuse, for every point
    for point in grid:  # the grid's values applied as each run applies them (--base-lr, --batch-size)
        try:
            resolve(argparse.Namespace(**{**vars(args), "base_lr": point.base_lr, "batch_size": point.batch_size}))
        except UserError as err:
            raise UserError(f"grid point {point.label}: {err}") from None
    recipe, machine = resolved.recipe, resolved.machine
    for flag, path in (("--finetune-from", recipe.model.finetune_from), ("--kd-teacher", recipe.distillation.teacher)):
        if path and not Path(path).is_file():
            raise UserError(f"{flag} {path} does not exist; pass a checkpoint_*.pt of ours or a torchvision "
                            "state dict (.pth)")
    # GPUs that CUDA cannot use, --device cuda without one, or the GPU loader without CUDA
    device = choose_device(machine.device)
    check_device(machine.for_device(device.type).loader, device)  # --loader auto: dali with CUDA, dali-cpu without


def with_tracker_group(extra: list[str], data: Path, out: Path) -> list[str]:
    """The flags after `--`, plus `--tracker-group <sweep folder name>` when the runs log to a tracker and no
    group was named: a sweep's runs are found together in W&B and MLflow."""
    from rn50.config.recipe import resolve

    machine = resolve(parse_run_flags(extra, data, out)).machine
    if machine.tracker == "none" or machine.tracker_group:
        return extra
    return [*extra, "--tracker-group", out.resolve().name]


# ---- one run ----

def train_command(point: GridPoint, data: Path, run_dir: Path, nproc: int, extra: list[str],
                  resume: bool) -> list[str]:
    launcher = [sys.executable, "-m", "rn50.train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "rn50.train"]
    command = [*launcher, "--data", str(data), "--out", str(run_dir), "--base-lr", f"{point.base_lr!r}",
               "--batch-size", str(point.batch_size), *extra]
    return command + (["--resume", "auto"] if resume else [])


def error_line(lines, code: int) -> str:
    """The line that says why a run failed: its `error: ...` line when it printed one (torchrun ends with
    a banner of its own), else its `stopped by ...` line (torchrun, signalled, ends with a traceback), else
    the last line with words in it (a traceback's exception)."""
    reason = next((l for l in reversed(lines) if l.startswith("error: ")), None) \
        or next((l for l in reversed(lines) if l.startswith("stopped by ")), None) \
        or next((l for l in reversed(lines) if re.search(r"[A-Za-z0-9]", l)), None)
    exit_text = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return f"{exit_text}: {reason.strip()}" if reason else exit_text


# rn50.train's advice after a stop signal: true for a run of one's own, not for a run of the sweep, which
# refuses --resume after `--` and resumes its unfinished runs itself
STOP_HINT = re.compile(r"^stopped by (?P<signal>\S+):.*--resume auto")
TRACEBACK_START = "Traceback (most recent call last):"


class StderrRelay:
    """What the sweep echoes of a run's stderr, line by line (`feed` returns the lines to write):
    - rn50.train's last line, `stopped by SIGNAL: checkpoint saved to PATH; exit code 75. Run the same command
      with --resume auto to continue` (any `stopped by SIGNAL:` line that advises `--resume auto`), becomes
      `stopped by SIGNAL: the run saved a checkpoint; the sweep continues it when run again`;
    - torchrun's own traceback when it was signalled (it ends in `SignalException: ... got signal: N`) becomes
      one line saying so: it reports the signal, it is no crash.
    Every other line passes unchanged. A traceback is held until its exception line, then written whole
    (any other exception) or summarised (torchrun's SignalException)."""

    def __init__(self):
        self.held: list[str] = []

    def feed(self, line: str) -> list[str]:
        text = line.rstrip("\n")
        if self.held:
            self.held.append(line)
            if not text or text[0].isspace():  # a frame of the traceback
                return []
            held, self.held = self.held, []  # the exception line ends the traceback
            if "SignalException" in text:
                number = re.search(r"got signal: (\S+)", text)
                return [f"torchrun: stopped by signal {number.group(1) if number else '?'} (the traceback it prints "
                        "then is its report of the signal, not a crash; left out here)\n"]
            return held
        if text == TRACEBACK_START:
            self.held = [line]
            return []
        hint = STOP_HINT.match(text)
        if hint:
            return [f"stopped by {hint['signal']}: the run saved a checkpoint; the sweep continues it when run "
                    "again\n"]
        return [line]

    def close(self) -> list[str]:
        """What is still held at the end of the stream (a traceback cut short)."""
        held, self.held = self.held, []
        return held


class Forwarder:
    """Passes SIGTERM/SIGUSR1 (a scheduler's "stop soon") on to the running training process, which saves a
    checkpoint and exits 75; the sweep then stops too, and the same command continues it later."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.received: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        if self.proc is not None and self.proc.poll() is None:
            # always SIGTERM: torchrun forwards it to its workers, while SIGUSR1 would kill torchrun alone
            # and orphan them (docs/design.md#signals-under-torchrun); a single training process treats both alike
            self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run_one(command: list[str], forwarder: Forwarder) -> tuple[int, str | None]:
    """Run one training command to its end. Its stdout goes straight to ours; its stderr is echoed line by
    line through StderrRelay and the echoed tail kept, to name the cause if it fails. Returns (exit code,
    error line or None)."""
    tail: collections.deque[str] = collections.deque(maxlen=200)
    relay = StderrRelay()

    def echo(lines: list[str]) -> None:
        for text in lines:
            sys.stderr.write(text)
            tail.append(text.rstrip("\n"))
        sys.stderr.flush()

    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1) as proc:
        forwarder.proc = proc
        try:
            for line in proc.stderr:
                echo(relay.feed(line))
            echo(relay.close())
        except KeyboardInterrupt:
            echo(relay.close())
            proc.wait()  # Ctrl-C reached the run too: let it finish dying before we report
            raise
        finally:
            forwarder.proc = None
        code = proc.wait()
    return code, None if code == 0 else error_line(tail, code)


# ---- results ----

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


# ---- outputs ----

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


# ---- the sweep ----

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
