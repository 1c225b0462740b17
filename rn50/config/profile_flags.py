"""The profiling flags alone (`--profile-steps A:B`, `--profiler`), with nothing heavier than argparse: the
commands read their flags before torch and DALI load (rn50.config.errors.check_flags_first). rn50.observe.profiling, which
re-exports these, does the profiling."""

from __future__ import annotations

import argparse
import re

TOOLS = ("torch", "nsys")
TRACE_DIR = "profile"  # under the run folder (training) or --out (harness)


def parse_steps(text: str) -> tuple[int, int]:
    """'A:B' -> (A, B), 1 <= A <= B; argparse turns the error into one line (exit 2)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"takes A:B, steps counted from 1 with A <= B (e.g. 10:12), got {text!r}")
    return int(match[1]), int(match[2])


def add_profiling_flags(parser: argparse.ArgumentParser, counted: str) -> None:
    parser.add_argument("--profile-steps", type=parse_steps, default=None, metavar="A:B",
                        help=f"profile steps A to B ({counted}; inclusive) into a torch.profiler trace under "
                             f"{TRACE_DIR}/, with named ranges for the input wait, host-to-device copy, forward, "
                             "backward, all-reduce and optimizer step (docs/profiling.md; default off)")
    parser.add_argument("--profiler", choices=TOOLS, default="torch",
                        help="what records the --profile-steps window: torch (a trace file per rank) or nsys "
                             "(the cudaProfilerApi capture range of `nsys profile`, NVTX ranges; CUDA only)")
