"""`--profile-steps A:B`: a profiler window over steps A to B (1-based, inclusive), and the named ranges.

Training counts global steps (step 1 is the run's first); the harness counts each measurement's steps from
its first warm-up step. With `--profiler torch` (the default) the window is a torch.profiler trace, one
Chrome/Perfetto JSON file per rank (`rank<R>.pt.trace.json`: ui.perfetto.dev and TensorBoard's profiler
plugin open it). With `--profiler nsys` the window is the cudaProfilerApi capture range of an enclosing
`nsys profile` (docs/profiling.md). The ranges ("input wait", "host-to-device copy", "forward",
"backward", "all-reduce", "optimizer step") are on only inside the window; elsewhere they cost nothing.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import torch

from pipelines import profiler_ranges
from pipelines.profiler_ranges import named_range  # also the callers' import: the one way to name a range
from rn50.config.errors import UserError
from rn50.config.profile_flags import TOOLS, TRACE_DIR, add_profiling_flags, parse_steps  # noqa: F401 - re-exported


def check_flags(window: tuple[int, int] | None, tool: str, device: torch.device) -> None:
    """At start-up: --profiler nsys needs a window and CUDA."""
    if tool == "nsys" and window is None:
        raise UserError("--profiler nsys needs --profile-steps A:B (the steps nsys captures)")
    if tool == "nsys" and device.type != "cuda":
        raise UserError("--profiler nsys needs a CUDA device (NVTX ranges, cudaProfilerApi capture range); "
                        "use --profiler torch here")


def check_window(window: tuple[int, int] | None, last_step: int, what: str) -> None:
    """At start-up: a window that ends after the last step could never be recorded whole."""
    if window and window[1] > last_step:
        raise UserError(f"--profile-steps {window[0]}:{window[1]}: {what} has {last_step} step{'s' if last_step != 1 else ''}; "
                        f"choose steps within 1:{last_step}")


# Kineto, torch.profiler's C++ side, writes "USDT:<time> <pid>:<tid> SyncActivityProfilerHandler.cpp:39]
# profiler_start" (and profiler_stop) to stderr at every start and stop of a trace: marks for tracing probes,
# nothing a user can act on. Its one switch, KINETO_LOG_LEVEL, would hide Kineto's errors with them, so these
# two lines alone are dropped.
_USDT_MARK = re.compile(rb"^USDT:.*\] profiler_(start|stop)\s*$")


def without_usdt_marks(call):
    """call(), with file descriptor 2 sent to a temporary file meanwhile and written back without Kineto's
    USDT start/stop lines: whatever else anything wrote to stderr in the meantime still comes out, in order."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            return call()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().splitlines(keepends=True) if not _USDT_MARK.match(line)]
            if kept:
                os.write(2, b"".join(kept))


class StepProfiler:
    """The window of one run (or one harness measurement) on one rank. Call begin(step) before waiting for
    step's batch and end(step) after its work; close() when the run ends, whatever the window's state."""

    def __init__(self, window: tuple[int, int] | None, folder: Path, rank: int, device: torch.device,
                 tool: str = "torch", say=print):
        self.window, self.folder, self.device, self.tool, self.say = window, folder, device, tool, say
        self.path = folder / f"rank{rank}.pt.trace.json" if window and tool == "torch" else None
        self.first = self.last = None  # the steps recorded
        self.written: Path | None = None  # the trace, once written
        self._profile = None
        self._step = None  # the open "ProfilerStep#N" range
        self._state = "waiting" if window else "off"

    def begin(self, step: int) -> None:
        if self._state == "waiting" and self.window[0] <= step <= self.window[1]:
            self._start(step)
        if self._state == "active":
            # the step's marker, named as torch.profiler's schedule names its steps (TensorBoard's plugin
            # splits the trace at them): input wait and work of one step under one range
            self._step = named_range(f"ProfilerStep#{step}")
            self._step.__enter__()

    def end(self, step: int) -> None:
        if self._state == "active":
            self._end_step()
            self.last = step
            if step >= self.window[1]:
                self._stop()

    def _start(self, step: int) -> None:
        self.first, self._state = step, "active"
        cuda = self.device.type == "cuda"
        profiler_ranges.enable(True, nvtx=cuda)
        if self.tool == "nsys":
            torch.cuda.profiler.start()
            return
        if not cuda:  # quiet Kineto's ERROR line about the GPU probe that fails, as expected, without a GPU
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        self._profile = torch.profiler.profile(activities=activities, record_shapes=False)
        without_usdt_marks(self._profile.start)

    def _end_step(self) -> None:
        if self._step is not None:
            self._step.__exit__(None, None, None)
            self._step = None

    def batches(self, loader, first: int, last: int, per_step: int = 1):
        """The loader's batches for steps first..last (this epoch's), `per_step` batches a step (--accum-steps'
        micro-batches), each wait inside an "input wait" range and each step between begin() and end(). The
        loader runs to its own end, as a plain for loop would. Without a window: the loader itself, untouched."""
        return loader if self._state == "off" else self._batches(loader, first, last, per_step)

    def _batches(self, loader, first: int, last: int, per_step: int):
        batches, step, micro = iter(loader), first, 0
        while True:
            if step <= last and micro == 0:
                self.begin(step)
            with named_range("input wait"):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch
            micro += 1
            if micro == per_step:
                self.end(step)
                step, micro = step + 1, 0

    def close(self) -> Path | None:
        """Ends a window the run cut short (it stopped or failed inside it) and says what was recorded."""
        if self._state == "active":
            self._stop()
        elif self._state == "waiting":
            self._state = "done"
            self.say(f"warning: --profile-steps {self.window[0]}:{self.window[1]}: no step of the window ran in "
                     "this run (it resumed after them, or stopped before them); nothing was profiled")
        return self.written

    def _stop(self) -> None:
        self._end_step()  # a step the run ended inside
        self._state = "done"
        self.last = self.first if self.last is None else self.last  # cut short inside its first step
        if self.device.type == "cuda":  # the window's last kernels finish inside it
            torch.cuda.synchronize(self.device)
        A, B = self.window
        cut = "" if (self.first, self.last) == (A, B) else f" (of the {A}-{B} asked for: the run started or ended inside it)"
        if self.tool == "nsys":
            torch.cuda.profiler.stop()
            profiler_ranges.enable(False)
            self.say(f"profiler: steps {self.first}-{self.last}{cut} were in the nsys capture range")
            return
        without_usdt_marks(self._profile.stop)
        profiler_ranges.enable(False)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._profile.export_chrome_trace(str(self.path))
        self._profile, self.written = None, self.path
        self.say(f"profiler: steps {self.first}-{self.last}{cut} traced into {self.path} (one rank<R> file per rank; "
                 f"open it in ui.perfetto.dev or `tensorboard --logdir {self.folder}`: docs/profiling.md)")


def named_all_reduce(hook):
    """A DDP comm hook: `hook` (the default all-reduce, or the fp16-compressing one) inside an "all-reduce"
    range. The range marks where each bucket's all-reduce is launched during backward; the transfer itself is
    the collective's kernel on the GPU timeline."""

    def all_reduce(state, bucket):
        with named_range("all-reduce"):
            return hook(state, bucket)

    return all_reduce
