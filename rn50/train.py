"""Train ResNet-50 with the 90-epoch recipe: `torchrun --nproc-per-node N -m rn50.train --data DIR --out RUN`.

Wires the recipe, loaders, training step, evaluation and checkpoints together; the logic lives in those
modules. Writes recipe.json, machine.json, metrics.jsonl, summary.json and checkpoints into the run folder.
Exit codes: 0 done, 2 a user error (one line says what to fix), 3 diverged, 4 a rank hung (the watchdog
names it), 75 preempted (a checkpoint was saved: run the same command with `--resume auto`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

# What reading the flags needs, and nothing heavier: `python -m rn50.train` reads them before the imports
# below parse_args load torch and DALI (seconds), so a mistyped flag is reported at once
from rn50.errors import UserError, check_flags_first
from rn50.profile_flags import TRACE_DIR, add_profiling_flags
from rn50.restart import parse_every
from rn50.recipe import (DATA_CHANGE, Machine, Recipe, add_recipe_flags, available_presets,
                         changes_from_defaults, epoch_plan, guard_resume, parse_strict, read_preset,
                         recipe_from_mapping, resolve, with_fields)

EXIT_DIVERGED = 3


class Preempted(Exception):
    """A stop signal, after the checkpoint it asked for (`saved`: its path on rank 0; None elsewhere, or
    where the weights held NaN and no checkpoint could be written)."""

    def __init__(self, signal_name: str, saved: Path | None):
        super().__init__(signal_name)
        self.signal_name, self.saved = signal_name, saved

    def report(self) -> str:
        """The run's last line: under torchrun, the agent's own SignalException report follows it."""
        saved = f"checkpoint saved to {self.saved}" if self.saved else "no new checkpoint (the weights held NaN or inf)"
        return (f"stopped by {self.signal_name}: {saved}; exit code {EXIT_PREEMPTED}. Run the same command with "
                "--resume auto to continue")


class DataLost(Preempted):
    """The data source failed mid-epoch after every retry (pipelines.storage.StorageLost). One process saves a
    checkpoint at the last step trained; with several, the ranks that still read are inside the step's
    all-reduce, so the last periodic checkpoint is where a resume starts (--checkpoint-every)."""

    def report(self) -> str:
        saved = f"checkpoint saved to {self.saved}" if self.saved else \
            "the last checkpoint (--checkpoint-every) is where a resume starts"
        return (f"stopped: {self.signal_name}; {saved}; exit code {EXIT_PREEMPTED}. When the storage answers "
                "again, run the same command with --resume auto")


class Diverged(Exception):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rn50.train", description=__doc__.splitlines()[0], allow_abbrev=False,
        epilog="The run folder gets recipe.json, machine.json, metrics.jsonl, summary.json, checkpoints and "
               "TensorBoard event files (RUN/tensorboard: `tensorboard --logdir RUN`). Presets: "
               + ", ".join(available_presets()) + ".")
    parser.add_argument("--data", required=True, type=Path, help="folder with train/<class>/ and val/<class>/")
    parser.add_argument("--out", required=True, type=Path, help="run folder for metrics, summary, checkpoints")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="folder with train.txt/val.txt from `python -m tools.scan`: train on those files only")
    parser.add_argument("--resume", default=None,
                        help="checkpoint to continue from, or 'auto': the newest valid one in --out (none: start)")
    parser.add_argument("--allow-change", default=None, metavar="FIELD[,FIELD]",
                        help="on --resume, accept these recipe fields differing from the checkpoint's (any other "
                             "change that alters a step is refused; machine settings change freely)")
    parser.add_argument("--reshard", action="store_true",
                        help="allow resuming with another number of processes (restarts the interrupted epoch)")
    parser.add_argument("--checkpoint-every", type=parse_every, default=0, metavar="STEPS|TIME",
                        help="also checkpoint every STEPS steps, or every TIME of training (30s, 10m, 2h; with the "
                             "loader state: exact mid-epoch resume)")
    parser.add_argument("--keep-checkpoints", type=int, default=3, metavar="K",
                        help="keep the last K checkpoints (and the best by top-1); 0 keeps all")
    parser.add_argument("--max-nonfinite-steps", type=int, default=50, metavar="K",
                        help="stop when the loss stays NaN/inf for K consecutive steps")
    parser.add_argument("--hang-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="end the job when a rank makes no progress for this long, naming the stalled "
                             "rank and what it was doing (0: off)")
    add_profiling_flags(parser, "global steps, the run's first is 1")
    add_recipe_flags(parser)
    return parse_strict(parser, argv)


if __name__ == "__main__":  # `python -m rn50.train`: the flags first (see the light imports at the top)
    check_flags_first(parse_args)

import torch  # noqa: E402 - below parse_args on purpose: torch and DALI take seconds to import

from rn50.checkpoint import (CheckpointStore, checkpoint_name, latest_checkpoint, load_checkpoint,  # noqa: E402
                             remove_stale_temporaries, restore_training, training_state)
from rn50.device import check_cuda_only_settings  # noqa: E402
from rn50.dist import (DistEnv, all_gather_objects, all_reduce_sum, any_rank, broadcast_buffers,  # noqa: E402
                       init_distributed, shutdown)
from rn50.evaluate import evaluate  # noqa: E402
from rn50.loaders import build_loaders, data_identity  # noqa: E402
from rn50.metrics import MetricsLog  # noqa: E402
from rn50.preemption import EXIT_PREEMPTED, StopRequest  # noqa: E402
from pipelines.storage import StorageLost, display  # noqa: E402
from rn50.profiling import StepProfiler, check_flags, check_window  # noqa: E402
from rn50.provenance import environment  # noqa: E402
from rn50.schedule import PlateauMultiplier, lr_at, peak_reached, set_lr  # noqa: E402
from rn50.step import TrainingParts, build_training, replicas_identical, train_step  # noqa: E402
from rn50.stopping import judge  # noqa: E402
from rn50.telemetry import Telemetry  # noqa: E402
from rn50 import tracking  # noqa: E402
from rn50.watchdog import Watchdog  # noqa: E402
from rn50 import restart  # noqa: E402


def prepare_out_dir(out: Path, resuming: bool, is_main: bool) -> list[str]:
    """Check that the run folder can take this run; returns what was cleaned up, for the start-up lines."""
    if not resuming and (out / "metrics.jsonl").exists():
        raise UserError(f"{out} already holds a run (metrics.jsonl); pass a new --out, or --resume one of its "
                        "checkpoints (or --resume auto) to continue it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # a unique name: every rank probes at once
    except OSError as exc:
        raise UserError(f"cannot write to the run folder {out} ({exc.strerror}); pass a writable --out") from None
    if not is_main:
        return []
    # a checkpoint write killed midway leaves its temporary file (checkpoint-sized) behind
    return [f"removed {stale.name}, left by a checkpoint write that never finished"
            for stale in remove_stale_temporaries(out)]


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

    def state_dict(self) -> dict:
        # float64 to a Python float and back is exact: the resumed sum continues bit for bit
        return {"total": self.total.item(), "streak": self.streak.item(), "worst": self.worst.item(),
                "steps": self.steps}


def _clock(seconds: float) -> str:
    """h:mm:ss (m:ss under an hour) for ETAs on the step line."""
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Trainer:
    """One run: the loop over epochs, with logging, validation and checkpoints."""

    def __init__(self, recipe: Recipe, machine: Machine, parts: TrainingParts, train_loader, val_loader,
                 env: DistEnv, out: Path, args: argparse.Namespace, watchdog: Watchdog, stop: StopRequest):
        self.recipe, self.machine, self.parts, self.env, self.out = recipe, machine, parts, env, out
        self.watchdog, self.stop = watchdog, stop
        self.train_loader, self.val_loader = train_loader, val_loader
        self.steps_per_epoch = len(train_loader)
        self.peak_lr = recipe.optimisation.peak_lr(env.world_size)
        self.peak_lr_reached = peak_reached(recipe.schedule, self.peak_lr, self.steps_per_epoch)  # < peak: a long warm-up
        self.log = MetricsLog(out / "metrics.jsonl", env.is_main, tensorboard_dir=out / "tensorboard")
        self.store = CheckpointStore(out, args.keep_checkpoints)
        self.checkpoint_every = restart.Cadence(args.checkpoint_every, 1 if env.world_size == 1 else 10)  # steps or a time
        self.max_nonfinite = args.max_nonfinite_steps
        self.telemetry = Telemetry(env.device.index if env.device.type == "cuda" else None)
        # --compile: the batch shape compiled for last. The first step at a new shape compiles (the run's
        # first; progressive resizing's first at each size): it is synchronised, timed alone, kept out of img/s
        self.compiled_shape: torch.Size | None = None
        self.validated_compiled = False  # --compile: whether validation has compiled its graphs in this process
        self.profiler = StepProfiler(args.profile_steps, out / TRACE_DIR, env.rank, env.device, args.profiler, self.say)
        self.start_epoch, self.start_offset = 0, 0  # where a resumed run continues
        self.losses: LossTracker | None = None  # the current epoch's
        self.resumed_losses: dict | None = None  # this rank's sums for the steps before a mid-epoch resume
        self.plateau = PlateauMultiplier(recipe.schedule)  # 1.0 unless the plateau schedule lowered it
        self.started = time.perf_counter()
        self.history: list[dict] = []  # one record per epoch, carried through checkpoints
        self.elapsed_before = 0.0  # run time before a resume
        self.data_identity: dict | None = None  # the training file list's (rn50.loaders.data_identity), checkpointed

    def say(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def run(self) -> dict:
        recipe, epochs = self.recipe, self.recipe.schedule.epochs
        self.say(f"training {recipe.model.arch} on {self.train_loader.num_samples} images ({self.steps_per_epoch} "
                 f"steps/epoch x {self.env.world_size} rank{'s' if self.env.world_size != 1 else ''} x "
                 f"{recipe.optimisation.batch_size}), validating on "
                 f"{self.val_loader.num_samples}; loader {self.machine.loader}, device {self.env.device}, "
                 f"peak LR {self.peak_lr:.4g}" + _reached(self.peak_lr, self.peak_lr_reached))
        for epoch in range(self.start_epoch, epochs):
            record = {"epoch": epoch + 1, "step": (epoch + 1) * self.steps_per_epoch}
            try:
                record.update(self.train_epoch(epoch, self.start_offset if epoch == self.start_epoch else 0))
            except StorageLost as lost:  # shard reads failed after every retry: a checkpoint, exit 75, no skipped data
                raise DataLost(str(lost), self.save(epoch, self.train_loader.position, epoch_end=False)
                               if self.env.world_size == 1 else None) from None
            record.update(self.validate(epoch))
            record["time_s"] = self.elapsed()
            verdict, warnings = judge(self.history + [record], recipe.stopping,
                                      any(h.get("target/epochs") for h in self.history))
            record.update(verdict)
            self.log.write(record)
            self.history.append(record)
            self.say(f"epoch {epoch + 1}/{epochs}: train loss {record['train/loss']:.4f}, "
                     f"{_rate(record['train/img_per_s'])} img/s; val loss {record['val/loss']:.4f} "
                     f"top-1 {record['val/top1']:.2f}% top-5 {record['val/top5']:.2f}% "
                     f"on {record['val/count']} images"
                     + (f"; EMA top-1 {record['val_ema/top1']:.2f}%" if "val_ema/top1" in record else ""))
            for warning in warnings:
                self.say(warning)
            if recipe.schedule.kind == "plateau":
                self.plateau.step(record["val/loss"])
            saved = self.save(epoch, self.steps_per_epoch, epoch_end=True)
            if self.stop.agreed(0, force=True):
                raise Preempted(self.stop.signal_name, saved)
            if record.get("stop"):
                self.say(f"stopping after epoch {epoch + 1}: {record['stop']}")
                break
        summary = self.summary()
        summary["ddp/replicas_identical"] = replicas_identical(self.parts.raw_model)
        if not summary["ddp/replicas_identical"]:
            self.say("warning: the ranks' weights differ at the end of the run (DDP replicas out of sync)")
        return summary

    def train_epoch(self, epoch: int, first: int) -> dict:
        """Steps `first`..end of epoch `epoch` (first > 0 when resuming mid-epoch)."""
        parts, spe, freeze = self.parts, self.steps_per_epoch, self.recipe.model.freeze_backbone_epochs
        self.train_loader.set_epoch(epoch)
        aug = self.recipe.augmentation
        if epoch > self.start_epoch and aug.train_size(epoch) != aug.train_size(epoch - 1):  # img/s changes with it
            self.say(f"epoch {epoch + 1}: training at {self.train_loader.image_size} px from now on (progressive "
                     f"resizing, {aug.train_size(epoch - 1)} px until now)")
        losses = self.losses = LossTracker(self.env.device, self.resumed_losses if first else None)
        self.resumed_losses = None
        host_wait = 0.0
        compiled, compiled_steps = None, 0  # --compile: seconds and number of this epoch's compiling steps
        self._sync()
        self.telemetry.start()
        begin = waited_from = time.perf_counter()
        # the live progress on each step line: time, input wait and compile time at the last line, and its step
        mark = {"at": begin, "wait": 0.0, "compiled": 0.0, "step": first}
        # global steps from 1: the --profile-steps window, and an "input wait" range around each batch in it
        batches = self.profiler.batches(self.train_loader, epoch * spe + first + 1, (epoch + 1) * spe)
        for i, (images, labels) in enumerate(batches, start=first):
            host_wait += time.perf_counter() - waited_from
            self.watchdog.progress(f"epoch {epoch + 1} step {i + 1}/{spe}: training step")
            step = epoch * spe + i
            lr = lr_at(self.recipe.schedule, self.peak_lr, step, spe) * self.plateau.value
            set_lr(parts.optimizer, lr, frozen=step < freeze * spe)
            if i == first:
                self.log.images("train/inputs", images, step,  # what the model sees, once an epoch
                                normalize=self.recipe.augmentation.normalize)
            compiling = self.machine.compile and images.shape != self.compiled_shape
            if compiling:
                self._sync()
                compile_from = time.perf_counter()
                # the watchdog allows a compile its own, longer limit (max-autotune can take many minutes)
                with self.watchdog.compiling(f"epoch {epoch + 1} step {i + 1}/{spe}: training step"):
                    loss = train_step(parts, images, labels)
                    self._sync()
            else:
                loss = train_step(parts, images, labels)
            if compiling:  # synchronised and timed alone: reported as compile_s, kept out of img/s
                took = time.perf_counter() - compile_from
                compiled, compiled_steps = (compiled or 0.0) + took, compiled_steps + 1
                at = f" at {images.shape[-1]} px" if self.compiled_shape else ""  # a new size: compiled again
                self.say(f"compiled in {took:.1f} s (the first step{at}, timed apart; not counted in img/s)")
                self.compiled_shape = images.shape
            losses.add(loss)
            # the only per-step host sync: at log intervals, and at the epoch's last step (an epoch shorter
            # than --log-every still gets its line)
            if (i + 1) % self.machine.log_every == 0 or i + 1 == spe:
                self.check_divergence(losses)
                # epoch counts epochs completed (fractional mid-epoch); train/loss is rank 0's step loss
                loss_value = loss.item()  # the sync: every step so far has finished, so the clock below is true
                self.log.write({"epoch": epoch + (i + 1) / spe, "step": step + 1, "time_s": self.elapsed(),
                                "lr": lr, "train/loss": loss_value})
                progress = self._progress(mark, i + 1, epoch, host_wait, compiled or 0.0)
                self.say(f"epoch {epoch + 1} step {i + 1}/{spe} lr {lr:.4g} loss {loss_value:.4f}{progress}")
            if i + 1 < spe:  # at an epoch's end, run() checkpoints after validation
                self.checkpoint_if_due(epoch, i + 1, step + 1, losses)
            self.watchdog.progress(f"epoch {epoch + 1} after step {i + 1}: waiting for the next batch")
            waited_from = time.perf_counter()
        self.check_divergence(losses)
        self._sync()
        seconds = time.perf_counter() - begin
        steps = spe - first
        images_seen = steps * self.recipe.optimisation.batch_size * self.env.world_size
        # img/s leaves out the steps that compiled in this epoch (their time is compile_s); None if no other ran
        timed_steps, timed_s = steps - compiled_steps, seconds - (compiled or 0.0)
        timed_images = timed_steps * self.recipe.optimisation.batch_size * self.env.world_size
        img_per_s = timed_images / timed_s if timed_steps else None
        # the whole epoch's steps, those before a resume included (their sums came with the checkpoint)
        mean_loss = all_reduce_sum(losses.total).item() / (losses.steps * self.env.world_size)
        return {
            "lr": lr,
            "train/loss": mean_loss,
            "train/resolution": self.train_loader.image_size,  # progressive resizing: this epoch's size
            "train/img_per_s": img_per_s,
            "train/img_per_s_per_gpu": img_per_s / self.env.world_size if img_per_s is not None else None,
            "train/epoch_s": seconds,
            **({"compile_s": compiled} if compiled is not None else {}),
            # host-side time waiting in next(): input stall on CPU runs; on an asynchronous GPU it is
            # not stall (the benchmark harness measures that on the GPU timeline)
            "train/host_wait_frac": host_wait / seconds,
            **self.gpu_telemetry(images_seen // self.env.world_size),
        }

    def _progress(self, mark: dict, done: int, epoch: int, host_wait: float, compiled: float) -> str:
        """The live part of a step line, measured since the previous line (host clocks only: the caller has
        just synchronised through loss.item()): img/s over all ranks, the share of that time rank 0 waited in
        next() for input, the ETA of this epoch's and of the run's training steps at that pace (validation
        not counted), and on CUDA the peak memory allocated so far. Steps that compiled are left out."""
        now = time.perf_counter()
        steps, wait = done - mark["step"], host_wait - mark["wait"]
        seconds = now - mark["at"] - (compiled - mark["compiled"])
        mark.update(at=now, wait=host_wait, compiled=compiled, step=done)
        if steps <= 0 or seconds <= 0:
            return ""
        per_step, spe = seconds / steps, self.steps_per_epoch
        images = steps * self.recipe.optimisation.batch_size * self.env.world_size
        left_epoch = (spe - done) * per_step
        left_run = left_epoch + (self.recipe.schedule.epochs - epoch - 1) * spe * per_step
        text = (f" | {images / seconds:.1f} img/s, input wait {100 * min(1.0, wait / seconds):.0f}%, "
                f"eta epoch {_clock(left_epoch)} run {_clock(left_run)}")
        if self.env.device.type == "cuda":
            text += f", peak mem {torch.cuda.max_memory_allocated(self.env.device) / 2**30:.2f} GiB"
        return text

    def checkpoint_if_due(self, epoch: int, steps_done: int, steps_total: int, losses: LossTracker) -> None:
        """One path for both mid-epoch checkpoints: the periodic one (--checkpoint-every) and the one a stop
        signal asks for, after which the run ends with exit code 75."""
        stopping, saved = self.stop.agreed(steps_total - 1), None
        if stopping or self.checkpoint_every.due(steps_total):
            self.check_divergence(losses)
            saved = self.save(epoch, steps_done, epoch_end=False)
        if stopping:
            raise Preempted(self.stop.signal_name, saved)

    def _sync(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)

    def gpu_telemetry(self, images: int) -> dict:
        """This rank's GPU over the epoch (NVML, sampled by rn50.telemetry, as the harness does) and its peak
        memory; nothing on the CPU, and only the memory where NVML cannot be read."""
        if self.env.device.type != "cuda":
            return {}
        readings = {"gpu/memory_peak_gib": torch.cuda.max_memory_allocated(self.env.device) / 2**30}
        torch.cuda.reset_peak_memory_stats(self.env.device)
        sampled = self.telemetry.stop(images=images)
        for ours, theirs in (("gpu/util_pct", "gpu_util_pct"), ("gpu/power_w", "power_w"),
                             ("gpu/sm_clock_mhz", "sm_clock_mhz"), ("gpu/energy_j_per_image", "energy_j_per_image")):
            if sampled.get(theirs) is not None:
                readings[ours] = sampled[theirs]
        return readings

    def check_divergence(self, losses: LossTracker) -> None:
        """Stop when the loss stayed non-finite for max_nonfinite steps in a row on any rank. GradScaler
        skips the odd overflowing fp16 step on its own; a long streak means the weights are gone."""
        if any_rank(losses.worst.item() >= self.max_nonfinite):
            raise Diverged(f"the training loss was NaN or inf for {self.max_nonfinite} steps in a row")

    def validate(self, epoch: int) -> dict:
        """The raw model, and the EMA weights beside it when the recipe keeps them (val_ema/*)."""
        broadcast_buffers(self.parts.raw_model)
        progress = lambda b: self.watchdog.progress(f"epoch {epoch + 1}: validation batch {b}")  # noqa: E731
        flip = self.recipe.augmentation.val_flip
        # --compile: this process's first validation compiles the eval-mode graphs (full and last batch)
        first_compiled = self.machine.compile and not self.validated_compiled
        self.validated_compiled = self.validated_compiled or self.machine.compile
        with self.watchdog.compiling(f"epoch {epoch + 1}: validation") if first_compiled else nullcontext():
            result = evaluate(self.parts.raw_model, self.val_loader, self.parts.amp_dtype, on_batch=progress,
                              flip=flip)
        if self.parts.ema is not None:
            ema = evaluate(self.parts.ema.module, self.val_loader, self.parts.amp_dtype, on_batch=progress,
                           flip=flip)
            result.update({key.replace("val/", "val_ema/"): value for key, value in ema.items()})
        return result

    def save(self, epoch: int, steps_done: int, epoch_end: bool) -> Path | None:
        """A checkpoint after `steps_done` steps of epoch `epoch` (0-based). Every rank takes part: each
        rank's loader state is its own (its shard, its augmentation stream) and rank 0 stores them all.
        Returns its path on rank 0 (None elsewhere, and where the weights hold NaN or inf)."""
        self.watchdog.progress(f"saving a checkpoint at epoch {epoch + 1} step {steps_done}")
        losses = self.losses.state_dict() if self.losses is not None and not epoch_end else None
        loader_states, epoch_losses = zip(*all_gather_objects((self.train_loader.state_dict(), losses)))
        if not self.env.is_main:
            return None
        epochs_done = epoch + 1 if epoch_end else epoch
        step = epoch * self.steps_per_epoch + steps_done
        state = training_state(self.parts, epochs_done=epochs_done, step=step, steps_per_epoch=self.steps_per_epoch,
                               plateau=self.plateau.state_dict(), loader_states=list(loader_states),
                               epoch_losses=list(epoch_losses) if not epoch_end else None,
                               loader_kind=self.machine.loader, recipe=self.recipe.to_dict(),
                               world_size=self.env.world_size, history=self.history, elapsed_s=self.elapsed(),
                               data=self.data_identity)
        if state is None:  # the kept checkpoints must stay good ones, whatever happens next
            self.say(f"not checkpointing at step {step}: the weights hold NaN or inf")
            return None
        top1 = [h["val/top1"] for h in self.history]
        is_best = epoch_end and bool(top1) and top1[-1] == max(top1) and self.history[-1]["epoch"] == epoch + 1
        return self.store.save(checkpoint_name(epochs_done, step, epoch_end), state, best=is_best)

    def restore(self, checkpoint: dict, exact: bool) -> str:
        """Weights, optimizer, scaler and position; the loader state and the epoch's loss sums too when the
        data stream is the same (`exact`: same world size, loader and recipe). Otherwise the interrupted
        epoch restarts. Returns the line that says where the run continues."""
        same_world = checkpoint["world_size"] == self.env.world_size
        saved_optimizer = recipe_from_mapping(checkpoint["recipe"]).optimisation.optimizer
        fresh_optimizer = saved_optimizer != self.recipe.optimisation.optimizer  # allowed with --allow-change
        restore_training(self.parts, checkpoint, fresh_optimizer=fresh_optimizer)
        if checkpoint.get("plateau"):
            self.plateau.load_state_dict(checkpoint["plateau"])
        self.history = list(checkpoint["history"])
        self.elapsed_before = checkpoint["elapsed_s"]
        self.start_epoch = checkpoint["epoch"]
        same_stream = same_world and exact and checkpoint.get("loader_kind", self.machine.loader) == self.machine.loader
        # an epoch of another length (batch or file count changed) is another stream: its offset means nothing here
        same_stream = same_stream and checkpoint["steps_per_epoch"] == self.steps_per_epoch
        if same_stream:
            self.start_offset = checkpoint["step"] - checkpoint["epoch"] * checkpoint["steps_per_epoch"]
            self.train_loader.load_state_dict(checkpoint["loader"][self.env.rank])
            self.resumed_losses = (checkpoint.get("epoch_losses") or [None] * self.env.world_size)[self.env.rank]
        return (f"resumed at epoch {self.start_epoch + 1}, step {self.start_offset} of {self.steps_per_epoch}"
                + ("" if same_world else f" (resharded from {checkpoint['world_size']} process{'es' if checkpoint['world_size'] != 1 else ''})")
                + ("" if same_stream or not same_world else " (the data stream changed: the epoch restarts)")
                + (f"; the optimizer changed ({saved_optimizer} -> {self.recipe.optimisation.optimizer}): its "
                   "state starts fresh" if fresh_optimizer else ""))

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        # the first epoch carries start-up costs (allocator, cuDNN autotuning, pipeline warm-up)
        steady = self.history[1:] or self.history
        # None: an epoch whose only step compiled (--compile) has no timed steps
        rates = [h["train/img_per_s"] for h in steady if h["train/img_per_s"] is not None]
        compiles = [h["compile_s"] for h in self.history if "compile_s" in h]  # epochs in which a step compiled
        recipe = self.recipe
        return {
            "epochs": recipe.schedule.epochs,
            "epochs_run": len(self.history),
            "final": {k: v for k, v in last.items() if k.startswith("val/")},
            "best/val_top1": max((h["val/top1"] for h in self.history), default=None),
            "best/val_ema_top1": max((h["val_ema/top1"] for h in self.history if "val_ema/top1" in h), default=None),
            # time-to-accuracy (DAWNBench style): run time and epochs to reach --target-top1
            "target": next(({"top1": recipe.stopping.target_top1, "time_s": h["target/time_s"],
                             "epochs": h["target/epochs"]} for h in self.history if "target/time_s" in h), None),
            "stopped_early": next((h["stop"] for h in self.history if "stop" in h), None),
            "train/img_per_s": sum(rates) / len(rates) if rates else None,
            "compile_s": sum(compiles) if compiles else None,  # --compile: never counted in img/s
            "wall_s": self.elapsed(),
            "world_size": self.env.world_size,
            "global_batch": recipe.optimisation.batch_size * self.env.world_size,
            "peak_lr": self.peak_lr,
            "peak_lr_reached": self.peak_lr_reached,  # below peak_lr when the warm-up outlasts the run
            "dataset": {"train_images": self.train_loader.num_samples,
                        "val_images": self.val_loader.num_samples},
            "recipe": recipe.to_dict(),
            "machine": self.machine.to_dict(),
            "environment": environment(),
        }


def missing_folders(out: Path) -> list[Path]:
    """`out` and those of its parents that do not exist yet, deepest first."""
    return [folder for folder in (out, *out.parents) if not folder.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove these folders, deepest first, where empty: a failed start leaves no run folder behind that did
    not exist before it (one that holds a file, a run's or anyone's, stays)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def find_resume(args: argparse.Namespace, say) -> tuple[Path | None, dict | None]:
    if args.resume is None:
        return None, None
    if args.resume == "auto":
        found = latest_checkpoint(args.out, say) if args.out.is_dir() else None
        if found is None:
            say(f"--resume auto: no checkpoint in {args.out}; starting from the beginning")
            return None, None
        say(f"--resume auto: continuing from {found[0]}")
        return found
    return Path(args.resume), load_checkpoint(Path(args.resume))


def check_data(checkpoint: dict, identity: dict | None, allowed: str | None) -> tuple[bool, list[str]]:
    """(the same training file list as the checkpoint's, notes). Another list is refused in one line unless
    --allow-change names `data` (then the interrupted epoch restarts: the loader's position belongs to the
    checkpoint's list). A checkpoint written before lists were recorded is accepted with a note."""
    saved = checkpoint.get("data")
    if identity is None:  # synthetic data: no files
        return True, []
    if saved is None:
        return True, ["note: the checkpoint records no training file list (written before they were recorded): "
                      "its loader position is used as is; resume with the --data and --manifest it trained on"]
    if saved == identity:
        return True, []
    change = f"{saved['count']} files (digest {saved['digest']}) -> {identity['count']} (digest {identity['digest']})"
    if DATA_CHANGE in {n.strip() for n in (allowed or "").split(",")}:
        return False, [f"changed on resume: training files: {change}; the interrupted epoch restarts"]
    raise UserError(f"the checkpoint was trained on another list of training files than --data/--manifest give "
                    f"now ({change}), so its position in the epoch means other images; resume with the same "
                    f"--data and --manifest, or pass --allow-change {DATA_CHANGE} to continue on the new list "
                    "(the interrupted epoch restarts)")


def finetune_arch(recipe: Recipe, args: argparse.Namespace, presets: tuple[str, ...]) -> tuple[Recipe, str | None]:
    """--finetune-from: the architecture the weights hold (rn50.model.arch_of_weights), checked at start-up.
    Without --arch (flag or preset) it becomes the run's, with a note; a different --arch is one line."""
    path = recipe.model.finetune_from
    if not path:
        return recipe, None
    from rn50.model import arch_of_weights, read_weights_file

    loaded = read_weights_file(path)
    found = arch_of_weights(loaded["model"] if isinstance(loaded.get("model"), dict) else loaded)
    if found is None or found == recipe.model.arch:
        return recipe, None  # weights that fit no ResNet are named by build_training's load, with the detail
    if args.arch is not None or any("arch" in read_preset(name) for name in presets):
        raise UserError(f"--finetune-from {path} holds {found} weights but this run's arch is {recipe.model.arch}; "
                        f"drop --arch (the weights say which) or pass --arch {found}")
    return with_fields(recipe, arch=found), f"arch {found}: read from --finetune-from {path}"


def check_world_size(checkpoint: dict, env: DistEnv, reshard: bool) -> None:
    if checkpoint["world_size"] != env.world_size and not reshard:
        raise UserError(
            f"the checkpoint was written by {checkpoint['world_size']} process"
            f"{'es' if checkpoint['world_size'] != 1 else ''} but this run has {env.world_size}; resume with "
            f"{checkpoint['world_size']} process{'es' if checkpoint['world_size'] != 1 else ''} in all, or pass "
            "--reshard to continue with the new count (the interrupted epoch restarts)"
        )


def finished(checkpoint: dict, saved: Recipe, recipe: Recipe, out: Path) -> bool:
    """The checkpoint ends a run that wrote its summary: every epoch done, or stopped early by rules that
    have not changed since (a longer --epochs, or new stopping rules, continue it)."""
    history = checkpoint["history"]
    stopped = bool(history) and "stop" in history[-1] and history[-1]["epoch"] == checkpoint["epoch"]
    return (out / "summary.json").is_file() and (
        checkpoint["epoch"] >= recipe.schedule.epochs or (stopped and saved.stopping == recipe.stopping))


def startup_summary(recipe: Recipe, machine: Machine, presets: str | None, out: Path, num_classes: int) -> list[str]:
    """A few lines on what this run does that the defaults do not; the whole recipe is in recipe.json."""
    changed = changes_from_defaults(recipe, machine)
    lines = [f"recipe{f' (presets {presets})' if presets else ''}: "
             + (f"the 90-epoch defaults except {', '.join(changed)}" if changed else "the 90-epoch defaults")
             + f"; all of it in {out / 'recipe.json'}"]
    kd = recipe.distillation
    if kd.teacher:
        lines.append(f"distilling from {kd.teacher} ({kd.teacher_arch}): loss = {kd.alpha:g} x T^2 x "
                     f"KL(teacher || student) at T = {kd.temperature:g} + {1 - kd.alpha:g} x cross-entropy")
    if machine.loader == "synthetic":
        lines.append(f"synthetic data: validation runs on other random images with random labels, so its top-1 "
                     f"stays near chance ({100 / num_classes:.2g}%); this run measures speed, not learning")
    return lines


def run(args: argparse.Namespace) -> dict:
    env = init_distributed(args.device or "auto")
    watchdog = Watchdog(env.rank, env.world_size, args.hang_timeout)
    # from the start, so a stop signal during start-up is honoured at the first step (one process: checked
    # every step; several: every 10, a tiny gloo all-reduce)
    stop = StopRequest(check_every=1 if env.world_size == 1 else 10)
    created = missing_folders(args.out)  # a start that fails removes them again (while they are empty)
    try:
        # records how this rank ended, for a restarted attempt's fault report (rn50.restart)
        return restart.recorded(run_with, env.rank, env.world_size, watchdog.describe, args, env, watchdog, stop)
    except (UserError, Preempted, Diverged):
        remove_empty(created)
        raise
    except Exception:
        remove_empty(created)
        if env.distributed:  # the traceback follows; first say which rank and where, for the job log
            print(f"failed: {watchdog.describe()}", file=sys.stderr, flush=True)
        raise
    finally:
        watchdog.close()
        stop.close()


def run_with(args: argparse.Namespace, env: DistEnv, watchdog: Watchdog, stop: StopRequest) -> dict:
    say = (lambda text: print(text, flush=True)) if env.is_main else (lambda text: None)
    job = restart.on_restart(args, say)  # restarted by torchrun after a fault: --resume auto
    # start-up lines wait until every start-up check has passed: an error found there comes alone
    notes: list[str] = []
    watchdog.progress("starting: reading the checkpoint")
    checkpoint_path, checkpoint = find_resume(args, notes.append)
    # a resumed run continues the saved recipe: presets and flags given now are changes to it, which the
    # resume guard accepts only where they do not alter a step (or are named in --allow-change)
    saved = recipe_from_mapping(checkpoint["recipe"]) if checkpoint else None
    resolved = resolve(args, saved)
    recipe, machine = resolved.recipe, resolved.machine.for_device(env.device.type)  # --loader auto made concrete
    if resolved.machine.loader != machine.loader:
        notes.append(f"loader auto: {machine.loader} (this process runs on {env.device})")
    changes = guard_resume(saved, recipe, args.allow_change) if saved else []
    recipe, arch_note = finetune_arch(recipe, args, resolved.presets) if not saved else (recipe, None)
    identity = data_identity(args.data, args.manifest, machine.loader)
    same_data, data_notes = check_data(checkpoint, identity, args.allow_change) if checkpoint else (True, [])
    check_cuda_only_settings(recipe, machine, env.device)
    check_flags(args.profile_steps, args.profiler, env.device)
    tracking.check_available(machine.tracker)  # a missing extra is a start-up error, not a lost run
    if checkpoint and finished(checkpoint, saved, recipe, args.out):
        # the run's own files stay as they are; a killed checkpoint write's temporary file is no part of them
        if env.is_main:
            for stale in remove_stale_temporaries(args.out):
                say(f"removed {stale.name}, left by a checkpoint write that never finished")
        stop = checkpoint["history"][-1].get("stop") if checkpoint["history"] else None
        say(f"{args.out} holds a finished run ({checkpoint_path.name}: {checkpoint['epoch']} of "
            f"{saved.schedule.epochs} epochs{f'; stopped early: {stop}' if stop else ''}): nothing to do, its "
            "files are left as they are. To train longer, add a larger --epochs"
            + ("" if saved.schedule.kind in ("step", "plateau") else " and --allow-change epochs")
            + "; to start again, pass a new --out")
        return json.loads((args.out / "summary.json").read_text())
    if checkpoint:
        check_world_size(checkpoint, env, args.reshard)
    notes += prepare_out_dir(args.out, resuming=args.resume is not None, is_main=env.is_main)
    notes += data_notes + ([arch_note] if arch_note else [])
    notes += resolved.overridden + [f"changed on resume: {change}" for change in changes] + epoch_plan(recipe)
    watchdog.progress("starting: listing and checking the data, building the loaders")
    train_loader, val_loader = build_loaders(recipe, machine, args.data, env, args.manifest)
    watchdog.progress("starting: building the model")
    check_window(args.profile_steps, recipe.schedule.epochs * len(train_loader),
                 f"this run ({recipe.schedule.epochs} epochs x {len(train_loader)} steps)")
    parts = build_training(recipe, train_loader.num_classes, env, machine, profiling=args.profile_steps is not None,
                           class_counts=train_loader.class_counts)
    notes += parts.notes
    trainer = Trainer(recipe, machine, parts, train_loader, val_loader, env, args.out, args, watchdog, stop)
    trainer.data_identity = identity
    if checkpoint:
        notes.append(trainer.restore(checkpoint, exact=not changes and same_data))
    for line in notes + startup_summary(recipe, resolved.machine, args.preset, args.out, train_loader.num_classes):
        say(line)
    restart.started(args.out, job, checkpoint, env, len(train_loader), say)  # the fault, steps lost
    if env.is_main:
        world = env.world_size
        recipe.save(args.out / "recipe.json", world_size=world, global_batch=recipe.optimisation.batch_size * world,
                    peak_lr=recipe.optimisation.peak_lr(world),
                    amp_in_use=str(parts.amp_dtype).removeprefix("torch.") if parts.amp_dtype else None)
        (args.out / "machine.json").write_text(json.dumps(machine.to_dict(), indent=2) + "\n")
    # --tracker: rank 0's tracker run (the same one again on resume); every metrics.jsonl line goes to it too
    trainer.log.tracker = tracking.for_training(recipe, machine, args.out, env, resume=checkpoint is not None, say=say)
    try:
        summary = trainer.run()
    except BaseException as ended:  # the tracker run ends with the run: preempted (a resume continues it) or failed
        trainer.log.tracker.close("KILLED" if isinstance(ended, Preempted) else "FAILED")
        raise
    finally:
        trainer.profiler.close()  # a window the run ended inside is written as far as it got
    summary["data"] = display(args.data)  # an s3:// URI stays one
    if env.is_main:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_report(summary, args.out)
        tracking.finish_training(trainer.log.tracker, args.out, summary,
                                 trainer.history[-1]["step"] if trainer.history else None)
    return summary


def _reached(peak: float, reached: float) -> str:
    return f", reached only {reached:.4g}: the warm-up outlasts the run" if reached < peak else ""


def _rate(img_per_s: float | None) -> str:
    return "n/a" if img_per_s is None else f"{img_per_s:.1f}"


def print_report(summary: dict, out: Path) -> None:
    final = summary["final"]
    lines = [
        "",
        f"run folder        {out}",
        f"processes         {summary['world_size']} (global batch {summary['global_batch']}, peak LR {summary['peak_lr']:.4g}"
        + _reached(summary["peak_lr"], summary.get("peak_lr_reached", summary["peak_lr"])) + ")",
        f"throughput        {_rate(summary['train/img_per_s'])} img/s in all, "
        f"{_rate(summary['train/img_per_s'] and summary['train/img_per_s'] / summary['world_size'])} per process",
        f"validation        top-1 {final.get('val/top1', math.nan):.2f}%  top-5 {final.get('val/top5', math.nan):.2f}%"
        f"  on {final.get('val/count')} of {summary['dataset']['val_images']} images",
        f"wall time         {summary['wall_s']:.1f} s",
    ]
    print("\n".join(lines), flush=True)


def main(argv=None) -> None:
    code = 0
    try:
        run(parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    except Preempted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(stop.report(), file=sys.stderr, flush=True)
        code = EXIT_PREEMPTED
    except Diverged as err:
        print(f"error: {err}; stopped without saving (the last good checkpoint is kept): lower the LR "
              "(--base-lr) or check the data", file=sys.stderr, flush=True)
        code = EXIT_DIVERGED
    finally:
        shutdown()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
