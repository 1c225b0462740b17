"""rn50.train's run settings: where a run reads and writes, how it resumes, checkpoints and watches itself.
Neither what is trained (rn50.config.recipe.Recipe) nor how this machine runs it (rn50.config.machine.Machine).
One flag per field (add_run_flags); `--checkpoint-every` takes steps or a time (parse_every)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path

from pipelines.registry import KINDS, REGISTRY
from rn50.config.profile_flags import TOOLS as PROFILERS, add_profiling_flags

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
# what a resume at another world size does with the interrupted epoch (rn50.reliability.lifecycle.resume_point):
# the registry's elastic kinds continue it (one global order whatever the world size), the others restart it
_ELASTIC = [k for k in KINDS if REGISTRY[k].elastic]
RESHARD_HELP = (f"allow resuming with another number of processes: the {', '.join(_ELASTIC)} loaders continue "
                f"the interrupted epoch over the new processes (each image once; where nothing else changed), "
                f"the {', '.join(k for k in KINDS if k not in _ELASTIC)} loaders restart it")


class Seconds(float):
    """--checkpoint-every given as a time (10m): checkpoint when this much training time has passed."""

    def __str__(self) -> str:
        return f"{float(self):g}s"


def parse_every(text: str):
    """`500` -> 500 steps; `30s`, `10m`, `1.5h` -> Seconds; 0 is off."""
    text = str(text).strip().lower()
    try:
        if text and text[-1] in _UNITS:
            value = float(text[:-1]) * _UNITS[text[-1]]
            if value > 0:
                return Seconds(value)
        elif int(text) >= 0:
            return int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"takes a number of steps (500) or a time (30s, 10m, 2h), not {text!r}")


def _run_opt(default, help: str, **flag):
    """A run setting: its default, its help and how argparse reads its flag (add_run_flags)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class RunSettings:
    """How rn50.train keeps this run: where it reads and writes, how it resumes, checkpoints and watches
    itself. Neither what is trained (Recipe) nor how this machine runs it (Machine). One flag per field
    (add_run_flags); the profiling flags are rn50.config.profile_flags', shared with the harness."""
    data: Path | None = _run_opt(None, "folder with train/<class>/ and val/<class>/", required=True, type=Path)
    out: Path | None = _run_opt(None, "run folder for metrics, summary, checkpoints", required=True, type=Path)
    manifest: Path | None = _run_opt(None, "folder with train.txt/val.txt from `python -m tools.scan`: train on "
                                           "those files only", type=Path)
    resume: str | None = _run_opt(None, "checkpoint to continue from, or 'auto': the newest valid one in --out "
                                        "(none: start)")
    allow_change: str | None = _run_opt(None, "on --resume, accept these recipe fields differing from the "
                                              "checkpoint's (any other change that alters a step is refused; "
                                              "the LR schedule's numbers and machine settings change freely)",
                                        metavar="FIELD[,FIELD]")
    reshard: bool = _run_opt(False, RESHARD_HELP, action="store_true")
    elastic_lr: str = _run_opt("scale", "when the world size changes on resume (an elastic change or --reshard): "
                                        "scale: the peak LR follows the new global batch (by the recipe's "
                                        "lr_scaling); keep: it stays the one the run trained with",
                               choices=("scale", "keep"))
    checkpoint_every: int = _run_opt(0, "also checkpoint every STEPS steps, or every TIME of training (30s, 10m, "
                                        "2h; with the loader state: exact mid-epoch resume)", type=parse_every,
                                     metavar="STEPS|TIME")
    keep_checkpoints: int = _run_opt(3, "keep the last K checkpoints (and the best by top-1); 0 keeps all",
                                     type=int, metavar="K")
    max_nonfinite_steps: int = _run_opt(50, "stop when the loss stays NaN/inf for K consecutive steps", type=int,
                                        metavar="K")
    hang_timeout: float = _run_opt(600.0, "end the job when a rank makes no progress for this long, naming the "
                                          "stalled rank and what it was doing (0: off)", type=float,
                                   metavar="SECONDS")
    profile_steps: tuple[int, int] | None = None  # --profile-steps A:B (rn50.config.profile_flags)
    profiler: str = PROFILERS[0]  # --profiler

    @classmethod
    def from_flags(cls, values: dict) -> "RunSettings":
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def add_run_flags(parser: argparse.ArgumentParser, counted: str) -> None:
    """rn50.train's run flags, one per RunSettings field, and the profiling flags (`counted`: what their
    steps count)."""
    for f in fields(RunSettings):
        if "flag" in f.metadata:
            parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"],
                                **f.metadata["flag"])
    add_profiling_flags(parser, counted)
