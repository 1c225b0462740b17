"""Train ResNet-50 with the 90-epoch recipe: `torchrun --nproc-per-node N -m rn50.train --data DIR --out RUN`.

Wires the recipe, loaders, training step, evaluation and checkpoints together; the logic lives in those
modules. Writes recipe.json, machine.json, metrics.jsonl, summary.json and checkpoints into the run folder.
Exit codes (rn50/reliability/exits.py): 0 done, 1 a bug, 2 a user error (one line says what to fix), 3 diverged,
4 a rank hung (the watchdog names it), 74 the storage refused a checkpoint, 75 preempted and 130 Ctrl-C (a
checkpoint was saved: run the same command with `--resume auto`).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

# Only what reading the flags needs: torch and DALI load (seconds) below parse_args, so a typo is reported at once
from rn50.config.errors import NodeWideError, UserError, check_flags_first
from rn50.config.profile_flags import TRACE_DIR
from rn50.config.recipe import Config, available_presets, resolve
from rn50.config.cli import add_recipe_flags, parse_strict
from rn50.config.run_settings import RunSettings, add_run_flags


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rn50.train", description=__doc__.splitlines()[0], allow_abbrev=False,
        epilog="The run folder gets recipe.json, machine.json, metrics.jsonl, summary.json, checkpoints and "
               "TensorBoard event files (RUN/tensorboard: `tensorboard --logdir RUN`). Presets: "
               + ", ".join(available_presets()) + ".")
    add_run_flags(parser, "global steps, the run's first is 1")
    add_recipe_flags(parser)
    return parse_strict(parser, argv)


if __name__ == "__main__":  # `python -m rn50.train`: the flags first (see the light imports at the top)
    check_flags_first(parse_args)
    # Ctrl-C while torch loads and the checkpoint is read, before the run's own handler (StopRequest), or after
    # the run: one line and 130 (exits.EXIT_INTERRUPTED), not a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, lambda *_: (os.write(2, b"stopped by SIGINT outside training: nothing to save; "
                                                        b"exit code 130\n"), os._exit(130)))

import torch  # noqa: E402 - below parse_args on purpose: torch and DALI take seconds to import

from rn50.observe import tracking  # noqa: E402
from rn50.reliability import lifecycle  # noqa: E402
from rn50.reliability.checkpoint import CheckpointStore, checkpoint_name, restore_training, training_state  # noqa: E402
from rn50.system.dist import DistEnv, all_gather_objects, any_rank, broadcast_buffers, init_distributed, shutdown  # noqa: E402
from rn50.core.loaders import build_loaders  # noqa: E402
from rn50.core import accumulation  # noqa: E402
from rn50.observe.meter import LossTracker, Meter  # noqa: E402
from rn50.observe.metrics import MetricsLog  # noqa: E402
from rn50.reliability.exits import exit_code_of  # noqa: E402
from rn50.reliability.preemption import DataLost, Diverged, Preempted, StopRequest  # noqa: E402
from pipelines.storage import StorageLost, display  # noqa: E402
from rn50.observe.profiling import StepProfiler, check_window  # noqa: E402
from rn50.system.provenance import environment  # noqa: E402
from rn50.core.schedule import PlateauMultiplier, lr_at, peak_reached, set_lr  # noqa: E402
from rn50.core.step import TrainingParts, build_training, replicas_identical, train_step  # noqa: E402
from rn50.core.stopping import judge  # noqa: E402
from rn50.core.validation import evaluate  # noqa: E402
from rn50.reliability.watchdog import Watchdog  # noqa: E402
from rn50.reliability import restart  # noqa: E402
from rn50.reliability.integrity import NotWritten  # noqa: E402


class Trainer:
    """One run: the loop over epochs, with logging, validation and checkpoints."""

    def __init__(self, config: Config, parts: TrainingParts, train_loader, val_loader, env: DistEnv,
                 watchdog: Watchdog, stop: StopRequest, data_identity: dict | None = None, weights: dict | None = None):
        self.config, self.recipe, self.machine, settings = config, config.recipe, config.machine, config.run
        self.parts, self.env, self.out = parts, env, settings.out
        self.watchdog, self.stop = watchdog, stop
        self.train_loader, self.val_loader = train_loader, val_loader
        self.accum_steps = self.recipe.optimisation.accum_steps  # micro-batches (loader batches) per optimizer step
        self.steps_per_epoch = accumulation.steps_per_epoch(len(train_loader), self.accum_steps)  # optimizer steps
        self.lr_world = env.world_size  # the world size whose peak LR this run uses (--elastic-lr keep: the first)
        self.peak_lr = self.recipe.optimisation.peak_lr(env.world_size)
        self.peak_lr_reached = peak_reached(self.recipe.schedule, self.peak_lr, self.steps_per_epoch)  # < peak: a long warm-up
        self.log = MetricsLog(self.out / "metrics.jsonl", env.is_main, tensorboard_dir=self.out / "tensorboard")
        self.store = CheckpointStore(self.out, settings.keep_checkpoints)
        # steps or a time
        self.checkpoint_every = restart.CheckpointCadence(settings.checkpoint_every, 1 if env.world_size == 1 else 10)
        self.max_nonfinite = settings.max_nonfinite_steps
        self.meter = Meter(env.device, self.recipe.optimisation.global_batch(env.world_size), env.world_size,
                           self.steps_per_epoch, self.recipe.schedule.epochs, self.machine.compile, self.say,
                           self.accum_steps)
        self.validated_compiled = False  # --compile: whether validation has compiled its graphs in this process
        self.profiler = StepProfiler(settings.profile_steps, self.out / TRACE_DIR, env.rank, env.device,
                                     settings.profiler, self.say)
        self.start_epoch, self.start_offset = 0, 0  # where a resumed run continues
        self.losses: LossTracker | None = None  # the current epoch's
        self.resumed_losses: dict | None = None  # this rank's sums for the steps before a mid-epoch resume
        self.plateau = PlateauMultiplier(self.recipe.schedule)  # 1.0 unless the plateau schedule lowered it
        self.started = time.perf_counter()
        self.history: list[dict] = []  # one record per epoch, carried through checkpoints
        self.elapsed_before = 0.0  # run time before a resume
        self.data_identity = data_identity  # the training file list's (rn50.core.loaders.data_identity), checkpointed
        self.weights = weights or {}  # what the run started from (lifecycle.Start.weights): in each checkpoint

    def say(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def run(self) -> dict:
        recipe, epochs = self.recipe, self.recipe.schedule.epochs
        accum = f" x {self.accum_steps} micro-batches" if self.accum_steps > 1 else ""
        self.say(f"training {recipe.model.arch} on {self.train_loader.num_samples} images ({self.steps_per_epoch} "
                 f"steps/epoch x {self.env.world_size} rank{'s' if self.env.world_size != 1 else ''}{accum} x "
                 f"{recipe.optimisation.batch_size}), validating on "
                 f"{self.val_loader.num_samples}; loader {self.machine.loader}, device {self.env.device}, "
                 f"peak LR {self.peak_lr:.4g}" + lifecycle.reached(self.peak_lr, self.peak_lr_reached))
        for epoch in range(self.start_epoch, epochs):
            record = {"epoch": epoch + 1, "step": (epoch + 1) * self.steps_per_epoch}
            try:
                record.update(self.train_epoch(epoch, self.start_offset if epoch == self.start_epoch else 0))
            except StorageLost as lost:  # shard reads failed after every retry: a checkpoint, exit 75, no skipped data
                done = accumulation.checkpoint_step(self.train_loader.position, self.accum_steps, self.steps_per_epoch)
                raise DataLost(str(lost), self.save(epoch, done, epoch_end=False)
                               if self.env.world_size == 1 and done is not None else None) from None
            record.update(self.validate(epoch))
            record["time_s"] = self.elapsed()
            verdict, warnings = judge(self.history + [record], recipe.stopping,
                                      any(h.get("target/epochs") for h in self.history))
            record.update(verdict)
            self.log.write(record)
            self.history.append(record)
            self.say(f"epoch {epoch + 1}/{epochs}: train loss {record['train/loss']:.4f}, "
                     f"{lifecycle.rate(record['train/img_per_s'])} img/s; val loss {record['val/loss']:.4f} "
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
        """Optimizer steps `first`..end of epoch `epoch` (first > 0 when resuming mid-epoch), K micro-batches each."""
        spe, accum, micro_losses = self.steps_per_epoch, self.accum_steps, []
        self.begin_epoch(epoch)
        losses = self.losses = LossTracker(self.env.device, self.resumed_losses if first else None)
        self.resumed_losses = None
        meter = self.meter.epoch(epoch, first)
        lr = self.set_lr(epoch * spe + first)  # (an elastic change can leave an epoch no whole global batch)
        # global steps from 1: the --profile-steps window, and an "input wait" range around each batch in it
        batches = self.profiler.batches(self.train_loader, epoch * spe + first + 1, (epoch + 1) * spe, accum)
        for i, micro, (images, labels) in accumulation.in_steps(meter.batches(batches), accum, first, spe):
            where = f"epoch {epoch + 1} step {i + 1}/{spe}: training step" + (
                f" (micro-batch {micro + 1}/{accum})" if accum > 1 else "")
            self.watchdog.progress(where)
            step = epoch * spe + i
            lr = self.set_lr(step) if micro == 0 else lr
            if i == first and micro == 0:  # what the model sees, once an epoch
                self.log.images("train/inputs", images, step, normalize=self.recipe.augmentation.normalize)
            micro_losses.append(self.train_step(images, labels, micro, meter, where))
            if micro + 1 < accum:  # the step goes on; stop signals and checkpoints wait for its end
                continue
            loss, micro_losses = accumulation.step_loss(micro_losses), []
            losses.add(loss)
            # the only per-step host sync: at log intervals, and at the epoch's last step (an epoch shorter
            # than --log-every still gets its line)
            if (i + 1) % self.machine.log_every == 0 or i + 1 == spe:
                self.log_step(epoch, i + 1, lr, loss, losses, meter)
            if i + 1 < spe:  # at an epoch's end, run() checkpoints after validation
                self.checkpoint_if_due(epoch, i + 1, step + 1, losses)
            self.watchdog.progress(f"epoch {epoch + 1} after step {i + 1}: waiting for the next batch")
        self.check_divergence(losses)
        figures = meter.finish()
        return {"lr": lr, "train/loss": losses.mean(self.env.world_size) if losses.steps else math.nan,
                "train/resolution": self.train_loader.image_size,  # progressive resizing: this epoch's size
                **figures}

    def begin_epoch(self, epoch: int) -> None:
        """The loader's epoch, and a line where progressive resizing changes the size (img/s changes with it)."""
        self.train_loader.set_epoch(epoch)
        aug = self.recipe.augmentation
        if epoch > self.start_epoch and aug.train_size(epoch) != aug.train_size(epoch - 1):
            self.say(f"epoch {epoch + 1}: training at {self.train_loader.image_size} px from now on (progressive "
                     f"resizing, {aug.train_size(epoch - 1)} px until now)")

    def set_lr(self, step: int) -> float:
        """This step's LR (the schedule's, times the plateau multiplier), set on the optimizer; zero on the
        backbone while --freeze-backbone-epochs lasts."""
        spe = self.steps_per_epoch
        lr = lr_at(self.recipe.schedule, self.peak_lr, step, spe) * self.plateau.value
        set_lr(self.parts.optimizer, lr, frozen=step < self.recipe.model.freeze_backbone_epochs * spe)
        return lr

    def train_step(self, images, labels, micro: int, meter, where: str) -> torch.Tensor:
        """rn50.core.step.train_step on micro-batch `micro` of a step; a call that compiles (--compile) is timed
        apart, and the watchdog allows it its own, longer limit (max-autotune can take many minutes)."""
        if not meter.compiles(images.shape):
            return train_step(self.parts, images, labels, micro)
        with self.watchdog.compiling(where), meter.compiling(images.shape):
            return train_step(self.parts, images, labels, micro)

    def log_step(self, epoch: int, done: int, lr: float, loss: torch.Tensor, losses: LossTracker, meter) -> None:
        """A metrics.jsonl line and a console line after `done` steps of the epoch: the one host sync."""
        self.check_divergence(losses)
        spe, step = self.steps_per_epoch, epoch * self.steps_per_epoch + done
        # epoch counts epochs completed (fractional mid-epoch); train/loss is rank 0's step loss
        loss_value = loss.item()  # the sync: every step so far has finished, so the clock below is true
        self.log.write({"epoch": epoch + done / spe, "step": step, "time_s": self.elapsed(), "lr": lr,
                        "train/loss": loss_value})
        self.say(f"epoch {epoch + 1} step {done}/{spe} lr {lr:.4g} loss {loss_value:.4f}{meter.progress(done)}")

    def checkpoint_if_due(self, epoch: int, steps_done: int, steps_total: int, losses: LossTracker) -> None:
        """One path for both mid-epoch checkpoints: the periodic one (--checkpoint-every) and the one a stop
        signal asks for, after which the run ends with exit code 75."""
        stopping, saved = self.stop.agreed(steps_total - 1), None
        if stopping or self.checkpoint_every.due(steps_total):
            self.check_divergence(losses)
            saved = self.save(epoch, steps_done, epoch_end=False)
        if stopping:
            raise Preempted(self.stop.signal_name, saved)

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
        refused, saved = None, None
        if self.env.is_main:
            try:
                saved = self._write_checkpoint(epoch, steps_done, epoch_end, loader_states, epoch_losses)
            except NotWritten as err:
                refused = err
        # every rank stops together when the storage refused it, so no rank trains on with nothing saved
        if any_rank(refused is not None):
            raise refused or NotWritten("")
        return saved

    def _write_checkpoint(self, epoch, steps_done, epoch_end, loader_states, epoch_losses) -> Path | None:
        epochs_done = epoch + 1 if epoch_end else epoch
        step = epoch * self.steps_per_epoch + steps_done
        state = training_state(self.parts, epochs_done=epochs_done, step=step, steps_per_epoch=self.steps_per_epoch,
                               plateau=self.plateau.state_dict(), loader_states=list(loader_states),
                               epoch_losses=list(epoch_losses) if not epoch_end else None,
                               loader_kind=self.machine.loader, recipe={**self.recipe.to_dict(), **self.weights},
                               world_size=self.env.world_size, history=self.history, elapsed_s=self.elapsed(),
                               data=self.data_identity)
        if state is not None:
            state["lr_world"] = self.lr_world
        if state is None:  # the kept checkpoints must stay good ones, whatever happens next
            self.say(f"not checkpointing at step {step}: the weights hold NaN or inf")
            return None
        top1 = [h["val/top1"] for h in self.history]
        is_best = epoch_end and bool(top1) and top1[-1] == max(top1) and self.history[-1]["epoch"] == epoch + 1
        return self.store.save(checkpoint_name(epochs_done, step, epoch_end), state, best=is_best)

    def restore(self, checkpoint: dict, saved, exact: bool) -> str:
        """Weights, optimizer, scaler and position from the checkpoint (`saved`: its recipe); the loader state
        and the epoch's loss sums too where lifecycle.resume_point finds the same data stream. Returns the
        line that says where the run continues."""
        point = lifecycle.resume_point(checkpoint, saved, self.recipe, self.machine.loader, self.env,
                                       self.steps_per_epoch, exact, train_images=self.train_loader.num_samples)
        if self.config.run.elastic_lr == "keep":  # the peak LR of the world size the run trained with
            self.lr_world = checkpoint.get("lr_world", checkpoint["world_size"])
            self.peak_lr = self.recipe.optimisation.peak_lr(self.lr_world)
            self.peak_lr_reached = peak_reached(self.recipe.schedule, self.peak_lr, self.steps_per_epoch)
        restore_training(self.parts, checkpoint, fresh_optimizer=point.fresh_optimizer)
        if checkpoint.get("plateau"):
            self.plateau.load_state_dict(checkpoint["plateau"])
        self.history = list(checkpoint["history"])
        self.elapsed_before = checkpoint["elapsed_s"]
        self.start_epoch, self.start_offset = point.epoch, point.offset
        if point.loader_state is not None:
            self.train_loader.load_state_dict(point.loader_state)
            self.resumed_losses = point.losses
        return point.note

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
            "global_batch": recipe.optimisation.global_batch(self.env.world_size),
            "peak_lr": self.peak_lr,
            "peak_lr_reached": self.peak_lr_reached,  # below peak_lr when the warm-up outlasts the run
            "dataset": {"train_images": self.train_loader.num_samples,
                        "val_images": self.val_loader.num_samples},
            "recipe": recipe.to_dict(),
            "machine": self.machine.to_dict(),
            "environment": environment(),
        }


def configure(flags: argparse.Namespace) -> tuple[Config, lifecycle.Resume]:
    """The door: the configuration, resolved once from the flags before the process group and the device
    exist, and the checkpoint to resume from (on a restart by torchrun, the newest: rn50.reliability.restart).
    A resumed run continues the checkpoint's recipe: the presets and flags given now are changes to it, which
    the resume guard (lifecycle.start) accepts only where they do not alter a step (or are named in
    --allow-change). Nothing below this function sees the flags."""
    resume, job = restart.resume_on_restart(flags.out, flags.resume)
    found = lifecycle.find_resume(flags.out, resume, job)
    return resolve({**vars(flags), "resume": resume}, saved=found.saved, run=RunSettings), found


def run(config: Config, resume: lifecycle.Resume) -> dict:
    env = init_distributed(config.machine.device)  # the resolved machine's device: a preset's [machine] too
    watchdog = Watchdog(env.rank, env.world_size, config.run.hang_timeout)
    # from the start, so a stop signal during start-up is honoured at the first step (one process: checked
    # every step; several: every 10, a tiny gloo all-reduce)
    stop = StopRequest(check_every=1 if env.world_size == 1 else 10, announce=env.is_main)
    created = lifecycle.missing_folders(config.run.out)  # a start that fails removes them again (while they are empty)
    try:
        # records how this rank ended, for a restarted attempt's fault report (rn50.reliability.restart)
        return restart.recorded(run_with, env.rank, env.world_size, watchdog.describe, config, resume, env,
                                watchdog, stop)
    except (UserError, Preempted, Diverged, NotWritten):
        lifecycle.remove_empty(created)
        raise
    except Exception:
        lifecycle.remove_empty(created)
        if env.distributed:  # the traceback follows; first say which rank and where, for the job log
            print(f"failed: {watchdog.describe()}", file=sys.stderr, flush=True)
        raise
    finally:
        watchdog.close()
        stop.close()


def run_with(config: Config, resume: lifecycle.Resume, env: DistEnv, watchdog: Watchdog, stop: StopRequest) -> dict:
    say = (lambda text: print(text, flush=True)) if env.is_main else (lambda text: None)
    watchdog.progress("starting: the start-up checks")
    start = lifecycle.start(config, resume, env, say)  # every start-up check, then the run folder
    if start.finished is not None:
        return start.finished
    config = start.config
    recipe, machine, settings = config.recipe, config.machine, config.run
    watchdog.progress("starting: listing and checking the data, building the loaders")
    train_loader, val_loader = build_loaders(recipe, machine, settings.data, env, settings.manifest)
    watchdog.progress("starting: building the model")
    spe = accumulation.steps_per_epoch(len(train_loader), recipe.optimisation.accum_steps)  # optimizer steps
    check_window(settings.profile_steps, recipe.schedule.epochs * spe,
                 f"this run ({recipe.schedule.epochs} epochs x {spe} steps)")
    parts = build_training(recipe, train_loader.num_classes, env, machine,
                           profiling=settings.profile_steps is not None, class_counts=train_loader.class_counts,
                           start_weights=start.checkpoint is None)
    trainer = Trainer(config, parts, train_loader, val_loader, env, watchdog, stop, start.identity, start.weights)
    notes = start.notes + parts.notes
    if start.checkpoint:
        notes.append(trainer.restore(start.checkpoint, start.saved, start.exact))
    for line in notes + lifecycle.startup_summary(config, start.machine_given, train_loader.num_classes):
        say(line)
    restart.started(settings.out, resume.job, start.checkpoint, env, spe, say)  # the fault, steps lost
    lifecycle.write_run_files(config, env, parts.amp_dtype, start.weights)
    # --tracker: rank 0's tracker run (the same one again on resume); every metrics.jsonl line goes to it too
    trainer.log.tracker = tracking.for_training(recipe, machine, settings.out, env,
                                                resume=start.checkpoint is not None, say=say)
    try:
        summary = trainer.run()
    except BaseException as ended:  # the tracker run ends with the run: preempted (a resume continues it) or failed
        trainer.log.tracker.close("KILLED" if isinstance(ended, Preempted) else "FAILED")
        raise
    finally:
        trainer.profiler.close()  # a window the run ended inside is written as far as it got
    summary["data"] = display(settings.data)  # an s3:// URI stays one
    if env.is_main:
        lifecycle.write_summary(settings.out, summary)
        lifecycle.print_report(summary, settings.out)
        tracking.finish_training(trainer.log.tracker, settings.out, summary,
                                 trainer.history[-1]["step"] if trainer.history else None)
    return summary


def main(argv=None) -> None:
    code = 0
    try:
        run(*configure(parse_args(argv)))
    except (UserError, Preempted, Diverged, NotWritten) as ended:  # the ends with a code of their own: one line
        code = exit_code_of(ended)
        if isinstance(ended, Preempted):
            if os.environ.get("RANK", "0") == "0":
                print(ended.report(), file=sys.stderr, flush=True)
        elif isinstance(ended, Diverged):
            print(f"error: {ended}; stopped without saving (the last good checkpoint is kept): lower the LR "
                  "(--base-lr) or check the data", file=sys.stderr, flush=True)
        elif str(ended) and (os.environ.get("LOCAL_RANK", "0") == "0" or not isinstance(ended, NodeWideError)):
            # NotWritten: rank 0, which tried the write, says why; NodeWideError: one line per node, not per process
            print(f"error: {ended}", file=sys.stderr, flush=True)
    finally:
        shutdown()
    if code:
        sys.exit(code)

if __name__ == "__main__":
    main()
