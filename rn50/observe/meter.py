"""Metering a run: the epoch's loss sums (LossTracker), its clocks (input wait, compile time, img/s), the
live ETA on each step line and the GPU telemetry of each epoch. What is measured, never what is trained:
rn50.train asks these for figures and prints or logs them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from rn50.system.dist import all_reduce_sum
from rn50.system.telemetry import Telemetry


class LossTracker:
    """An epoch's training loss summed on the device, and the longest run of non-finite losses: read only
    where the host syncs anyway (log intervals, checkpoints, the epoch's end). A mid-epoch checkpoint
    carries its state, so a resumed epoch reports the same train/loss as one never interrupted."""

    def __init__(self, device: torch.device, state: dict | None = None):
        state = state or {"total": 0.0, "streak": 0.0, "worst": 0.0, "steps": 0}
        self.total = torch.tensor(state["total"], device=device, dtype=torch.float64)
        self.streak = torch.tensor(state["streak"], device=device)
        self.worst = torch.tensor(state["worst"], device=device)
        self.steps = state["steps"]

    def add(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        self.total += torch.where(finite, loss, 0.0).double()
        self.streak = (self.streak + 1) * ~finite
        self.worst = torch.maximum(self.worst, self.streak)
        self.steps += 1

    def mean(self, world_size: int) -> float:
        """The mean over every rank's steps of the epoch, those before a resume included (a collective)."""
        return all_reduce_sum(self.total).item() / (self.steps * world_size)

    def state_dict(self) -> dict:
        # float64 to a Python float and back is exact: the resumed sum continues bit for bit
        return {"total": self.total.item(), "streak": self.streak.item(), "worst": self.worst.item(),
                "steps": self.steps}


def clock(seconds: float) -> str:
    """h:mm:ss (m:ss under an hour) for ETAs on the step line."""
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Meter:
    """The run's clocks. `images_per_step`: of an optimizer step, over all ranks; `compile`: --compile, whose
    first micro-batch at each batch shape (the run's first; progressive resizing's first at each size) is
    synchronised, timed alone and kept out of img/s; `accum_steps`: micro-batches per optimizer step."""

    def __init__(self, device: torch.device, images_per_step: int, world_size: int, steps_per_epoch: int,
                 epochs: int, compile: bool, say, accum_steps: int = 1):
        self.device, self.images_per_step, self.world_size = device, images_per_step, world_size
        self.accum_steps = accum_steps
        self.steps_per_epoch, self.epochs, self.compile, self.say = steps_per_epoch, epochs, compile, say
        self.compiled_shape: torch.Size | None = None
        self.telemetry = Telemetry(device.index if device.type == "cuda" else None)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def epoch(self, epoch: int, first: int) -> "EpochMeter":
        return EpochMeter(self, epoch, first)


class EpochMeter:
    """One epoch's clocks, from its first step (`first` > 0 when resuming mid-epoch) to finish()."""

    def __init__(self, run: Meter, epoch: int, first: int):
        self.run, self.epoch, self.first = run, epoch, first
        self.host_wait = 0.0
        self.compiled, self.compiled_steps = None, 0  # seconds and steps of this epoch that compiled
        run.sync()
        run.telemetry.start()
        self.begin = time.perf_counter()
        # the live progress on each step line: time, input wait and compile time at the last line, and its step
        self.mark = {"at": self.begin, "wait": 0.0, "compiled": 0.0, "step": first}

    def batches(self, batches):
        """The batches, with the host's time waiting for each one counted (train/host_wait_frac)."""
        waited_from = self.begin
        for batch in batches:
            self.host_wait += time.perf_counter() - waited_from
            yield batch
            waited_from = time.perf_counter()

    def compiles(self, shape: torch.Size) -> bool:
        return self.run.compile and shape != self.run.compiled_shape

    @contextmanager
    def compiling(self, shape: torch.Size):
        """Around a step that compiles: synchronised and timed alone, reported as compile_s, not in img/s."""
        self.run.sync()
        began = time.perf_counter()
        yield
        self.run.sync()
        took = time.perf_counter() - began
        # the micro-batch that compiled: 1/K of a step's images left out of img/s with its time
        self.compiled = (self.compiled or 0.0) + took
        self.compiled_steps += 1 / self.run.accum_steps
        at = f" at {shape[-1]} px" if self.run.compiled_shape else ""  # a new size: compiled again
        self.run.say(f"compiled in {took:.1f} s (the first step{at}, timed apart; not counted in img/s)")
        self.run.compiled_shape = shape

    def progress(self, done: int) -> str:
        """The live part of a step line, measured since the previous line (host clocks only: the caller has
        just synchronised through loss.item()): img/s over all ranks, the share of that time rank 0 waited in
        next() for input, the ETA of this epoch's and of the run's training steps at that pace (validation
        not counted), and on CUDA the peak memory torch's allocator handed out so far (not DALI's pools: the whole
        device's peak, from NVML, is in the epoch's gpu/memory_used_peak_gib). Steps that compiled are left out."""
        now, mark, compiled = time.perf_counter(), self.mark, self.compiled or 0.0
        steps, wait = done - mark["step"], self.host_wait - mark["wait"]
        seconds = now - mark["at"] - (compiled - mark["compiled"])
        mark.update(at=now, wait=self.host_wait, compiled=compiled, step=done)
        if steps <= 0 or seconds <= 0:
            return ""
        run = self.run
        per_step, spe = seconds / steps, run.steps_per_epoch
        left_epoch = (spe - done) * per_step
        left_run = left_epoch + (run.epochs - self.epoch - 1) * spe * per_step
        text = (f" | {steps * run.images_per_step / seconds:.1f} img/s, input wait "
                f"{100 * min(1.0, wait / seconds):.0f}%, eta epoch {clock(left_epoch)} run {clock(left_run)}")
        if run.device.type == "cuda":
            text += f", peak mem {torch.cuda.max_memory_allocated(run.device) / 2**30:.2f} GiB (torch)"
        return text

    def finish(self) -> dict:
        """The epoch's figures: img/s over the steps that did not compile (None if no other ran), its time,
        its compile time, the host's input wait and this rank's GPU telemetry."""
        run = self.run
        run.sync()
        seconds = time.perf_counter() - self.begin
        steps = run.steps_per_epoch - self.first
        timed_steps, timed_s = steps - self.compiled_steps, seconds - (self.compiled or 0.0)
        img_per_s = timed_steps * run.images_per_step / timed_s if timed_steps else None
        return {
            "train/img_per_s": img_per_s,
            "train/img_per_s_per_gpu": img_per_s / run.world_size if img_per_s is not None else None,
            "train/epoch_s": seconds,
            **({"compile_s": self.compiled} if self.compiled is not None else {}),
            # host-side time waiting in next(): input stall on CPU runs; on an asynchronous GPU it is
            # not stall (the benchmark harness measures that on the GPU timeline)
            "train/host_wait_frac": self.host_wait / seconds,
            **self.gpu_telemetry(steps * run.images_per_step // run.world_size),
        }

    def gpu_telemetry(self, images: int) -> dict:
        """This rank's GPU over the epoch (NVML, sampled by rn50.system.telemetry, as the harness does) and its peak
        memory, torch's allocator's (gpu/memory_peak_gib) and the whole device's as NVML sees it
        (gpu/memory_used_peak_gib: DALI's pools, torch's cache, the CUDA context, other processes); nothing on
        the CPU, and only torch's figure where NVML cannot be read."""
        device = self.run.device
        if device.type != "cuda":
            return {}
        readings = {"gpu/memory_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
        torch.cuda.reset_peak_memory_stats(device)
        sampled = self.run.telemetry.stop(images=images)
        for ours, theirs in (("gpu/util_pct", "gpu_util_pct"), ("gpu/power_w", "power_w"),
                             ("gpu/sm_clock_mhz", "sm_clock_mhz"), ("gpu/energy_j_per_image", "energy_j_per_image"),
                             ("gpu/memory_used_peak_gib", "memory_used_peak_gib")):
            if sampled.get(theirs) is not None:
                readings[ours] = sampled[theirs]
        return readings
