"""Train ResNet-50 with the 90-epoch recipe: `torchrun --nproc-per-node N -m rn50.train --data DIR --out RUN`.

Wires the recipe, loaders, training step, evaluation and checkpoints together; the logic lives in those
modules. Writes recipe.json, metrics.jsonl, summary.json and checkpoints into the run folder.
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
from pathlib import Path

import torch

from rn50.checkpoint import CheckpointStore, checkpoint_name, latest_checkpoint, load_checkpoint
from rn50.dist import (DistEnv, all_gather_objects, all_reduce_sum, any_rank, broadcast_buffers, init_distributed,
                       shutdown)
from rn50.device import DEVICES
from rn50.errors import UserError
from rn50.evaluate import evaluate
from rn50.loaders import build_loaders
from rn50.metrics import MetricsLog
from rn50.preemption import EXIT_PREEMPTED, StopRequest
from rn50.provenance import environment
from rn50.recipe import Recipe, add_recipe_flags, available_presets, format_recipe, from_mapping, parse_strict, recipe_from_args
from rn50.schedule import PlateauMultiplier, lr_at, set_lr
from rn50.step import TrainingParts, build_training, state_digest, train_step
from rn50.watchdog import Watchdog

EXIT_DIVERGED = 3


class Preempted(Exception):
    pass


class Diverged(Exception):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rn50.train", description=__doc__.splitlines()[0], allow_abbrev=False,
        epilog="The run folder gets recipe.json, metrics.jsonl, summary.json, checkpoints and TensorBoard event "
               "files (RUN/tensorboard: `tensorboard --logdir RUN`). Presets: " + ", ".join(available_presets()) + ".")
    parser.add_argument("--data", required=True, type=Path, help="folder with train/<class>/ and val/<class>/")
    parser.add_argument("--out", required=True, type=Path, help="run folder for metrics, summary, checkpoints")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: this process's GPU when CUDA works, else the CPU (an error when NVIDIA GPUs "
                             "are present but CUDA is unusable); cpu: the CPU even on a GPU machine")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="folder with train.txt/val.txt from `python -m tools.scan`: train on those files only")
    parser.add_argument("--resume", default=None,
                        help="checkpoint to continue from, or 'auto': the newest valid one in --out (none: start)")
    parser.add_argument("--reshard", action="store_true",
                        help="allow resuming with another number of processes (restarts the interrupted epoch)")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                        help="also checkpoint every STEPS steps (with the loader state: exact mid-epoch resume)")
    parser.add_argument("--keep-checkpoints", type=int, default=3, metavar="K",
                        help="keep the last K checkpoints (and the best by top-1); 0 keeps all")
    parser.add_argument("--max-nonfinite-steps", type=int, default=50, metavar="K",
                        help="stop when the loss stays NaN/inf for K consecutive steps")
    parser.add_argument("--hang-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="end the job when a rank makes no progress for this long, naming the stalled "
                             "rank and what it was doing (0: off)")
    add_recipe_flags(parser)
    return parse_strict(parser, argv)


def prepare_out_dir(out: Path, resuming: bool) -> None:
    if not resuming and (out / "metrics.jsonl").exists():
        raise UserError(f"{out} already holds a run (metrics.jsonl); pass a new --out, or --resume one of its "
                        "checkpoints (or --resume auto) to continue it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # a unique name: every rank probes at once
    except OSError as exc:
        raise UserError(f"cannot write to the run folder {out} ({exc.strerror}); pass a writable --out") from None


class Trainer:
    """One run: the loop over epochs, with logging, validation and checkpoints."""

    def __init__(self, recipe: Recipe, parts: TrainingParts, train_loader, val_loader, env: DistEnv, out: Path,
                 args: argparse.Namespace, watchdog: Watchdog, stop: StopRequest):
        self.recipe, self.parts, self.env, self.out, self.watchdog = recipe, parts, env, out, watchdog
        self.train_loader, self.val_loader = train_loader, val_loader
        self.steps_per_epoch = len(train_loader)
        self.log = MetricsLog(out / "metrics.jsonl", env.is_main, tensorboard_dir=out / "tensorboard")
        self.store = CheckpointStore(out, args.keep_checkpoints)
        self.checkpoint_every = args.checkpoint_every
        self.max_nonfinite = args.max_nonfinite_steps
        self.stop = stop
        self.start_epoch, self.start_offset = 0, 0  # where a resumed run continues
        self.plateau = PlateauMultiplier(recipe)  # 1.0 unless the plateau schedule lowered it
        self.reached_target = False
        self.started = time.perf_counter()
        self.history: list[dict] = []  # one record per epoch, carried through checkpoints
        self.elapsed_before = 0.0  # run time before a resume

    def say(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)

    def _sync(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)

    def train_epoch(self, epoch: int, first: int) -> dict:
        """Steps `first`..end of epoch `epoch` (first > 0 when resuming mid-epoch)."""
        recipe, parts = self.recipe, self.parts
        self.train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.env.device)
        # consecutive non-finite losses, counted on the device (read only where the host syncs anyway)
        streak = torch.zeros((), device=self.env.device)
        worst = torch.zeros((), device=self.env.device)
        host_wait = 0.0
        self._sync()
        begin = waited_from = time.perf_counter()
        for i, (images, labels) in enumerate(self.train_loader, start=first):
            host_wait += time.perf_counter() - waited_from
            self.watchdog.progress(f"epoch {epoch + 1} step {i + 1}/{self.steps_per_epoch}: training step")
            step = epoch * self.steps_per_epoch + i
            lr = lr_at(recipe, step, self.steps_per_epoch, self.env.world_size) * self.plateau.value
            set_lr(parts.optimizer, lr, frozen=step < recipe.freeze_backbone_epochs * self.steps_per_epoch)
            if i == first:
                self.log.images("train/inputs", images, step)  # what the model sees, once an epoch
            loss = train_step(parts, images, labels)
            finite = torch.isfinite(loss)
            loss_sum += torch.where(finite, loss, 0.0)
            streak = (streak + 1) * ~finite
            worst = torch.maximum(worst, streak)
            if (i + 1) % recipe.log_every == 0:  # the only per-step host sync, at log intervals
                self.check_divergence(worst)
                # epoch counts epochs completed (fractional mid-epoch); train/loss is rank 0's step loss
                record = {"epoch": epoch + (i + 1) / self.steps_per_epoch, "step": step + 1,
                          "time_s": self.elapsed(), "lr": lr, "train/loss": loss.item()}
                self.log.write(record)
                self.say(f"epoch {epoch + 1} step {i + 1}/{self.steps_per_epoch} lr {lr:.4g} "
                         f"loss {record['train/loss']:.4f}")
            last_step = i + 1 == self.steps_per_epoch
            if not last_step and self.stop.agreed(step):  # at an epoch's end, run() stops after validation
                self.check_divergence(worst)
                self.save(epoch, i + 1, epoch_end=False)
                raise Preempted(self.stop.signal_name)
            if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0 and not last_step:
                self.check_divergence(worst)
                self.save(epoch, i + 1, epoch_end=False)
            self.watchdog.progress(f"epoch {epoch + 1} after step {i + 1}: waiting for the next batch")
            waited_from = time.perf_counter()
        self.check_divergence(worst)
        self._sync()
        seconds = time.perf_counter() - begin
        steps = self.steps_per_epoch - first
        images_seen = steps * recipe.batch_size * self.env.world_size
        mean_loss = all_reduce_sum(loss_sum.double()).item() / (steps * self.env.world_size)
        return {
            "lr": lr,
            "train/loss": mean_loss,
            "train/img_per_s": images_seen / seconds,
            "train/img_per_s_per_gpu": images_seen / seconds / self.env.world_size,
            "train/epoch_s": seconds,
            # host-side time waiting in next(): input stall on CPU runs; on an asynchronous GPU it is
            # not stall (the benchmark harness measures that on the GPU timeline)
            "train/host_wait_frac": host_wait / seconds,
            **self.gpu_telemetry(),
        }

    def gpu_telemetry(self) -> dict:
        """This rank's GPU at the epoch's end (torch's NVML readings) and its peak memory in the epoch;
        nothing on CPU, and nothing where NVML cannot be read."""
        if self.env.device.type != "cuda":
            return {}
        readings = {"gpu/memory_peak_gib": torch.cuda.max_memory_allocated(self.env.device) / 2**30}
        torch.cuda.reset_peak_memory_stats(self.env.device)
        for name, read in (("gpu/util_pct", torch.cuda.utilization), ("gpu/power_w", torch.cuda.power_draw),
                           ("gpu/sm_clock_mhz", torch.cuda.clock_rate)):
            try:
                value = read(self.env.device)
                readings[name] = value / 1000 if name == "gpu/power_w" else value  # power_draw is in mW
            except Exception:  # no pynvml, no permission: not available, never an error
                pass
        return readings

    def check_divergence(self, worst: torch.Tensor) -> None:
        """Stop when the loss stayed non-finite for max_nonfinite steps in a row on any rank. GradScaler
        skips the odd overflowing fp16 step on its own; a long streak means the weights are gone."""
        if any_rank(worst.item() >= self.max_nonfinite):
            raise Diverged(f"the training loss was NaN or inf for {self.max_nonfinite} steps in a row")

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def run(self) -> dict:
        recipe = self.recipe
        self.say(f"training {recipe.arch} on {self.train_loader.num_samples} images "
                 f"({self.steps_per_epoch} steps/epoch x {self.env.world_size} ranks x {recipe.batch_size}), "
                 f"validating on {self.val_loader.num_samples}; loader {recipe.loader}, device {self.env.device}, "
                 f"peak LR {recipe.peak_lr(self.env.world_size):.4g}")
        for epoch in range(self.start_epoch, recipe.epochs):
            record = {"epoch": epoch + 1, "step": (epoch + 1) * self.steps_per_epoch}
            record.update(self.train_epoch(epoch, self.start_offset if epoch == self.start_epoch else 0))
            record.update(self.validate(epoch))
            record["time_s"] = self.elapsed()
            record.update(self.judge(record))
            self.log.write(record)
            self.history.append(record)
            self.say(f"epoch {epoch + 1}/{recipe.epochs}: train loss {record['train/loss']:.4f}, "
                     f"{record['train/img_per_s']:.1f} img/s; val loss {record['val/loss']:.4f} "
                     f"top-1 {record['val/top1']:.2f}% top-5 {record['val/top5']:.2f}% "
                     f"on {record['val/count']} images"
                     + (f"; EMA top-1 {record['val_ema/top1']:.2f}%" if "val_ema/top1" in record else ""))
            if recipe.schedule == "plateau":
                self.plateau.step(record["val/loss"])
            self.save(epoch, self.steps_per_epoch, epoch_end=True)
            if self.stop.agreed(0, force=True):
                raise Preempted(self.stop.signal_name)
            if record.get("stop"):
                self.say(f"stopping after epoch {epoch + 1}: {record['stop']}")
                break
        summary = self.summary()
        summary["ddp/replicas_identical"] = self.replicas_identical()
        return summary

    def validate(self, epoch: int) -> dict:
        """The raw model, and the EMA weights beside it when the recipe keeps them (val_ema/*)."""
        broadcast_buffers(self.parts.raw_model)
        progress = lambda b: self.watchdog.progress(f"epoch {epoch + 1}: validation batch {b}")  # noqa: E731
        result = evaluate(self.parts.raw_model, self.val_loader, self.parts.amp_dtype, on_batch=progress)
        if self.parts.ema is not None:
            ema = evaluate(self.parts.ema.module, self.val_loader, self.parts.amp_dtype, on_batch=progress)
            result.update({key.replace("val/", "val_ema/"): value for key, value in ema.items()})
        return result

    def judge(self, record: dict) -> dict:
        """Stopping rules and warnings after an epoch: target top-1 reached (time-to-accuracy), no better
        top-1 for early_stop_patience epochs, and a growing gap between validation and training loss."""
        recipe, verdict = self.recipe, {}
        history = self.history + [record]
        top1 = [h["val/top1"] for h in history]
        if recipe.target_top1 and record["val/top1"] >= recipe.target_top1 and not self.reached_target:
            self.reached_target = True
            verdict["stop"] = f"validation top-1 reached the target {recipe.target_top1}%"
            verdict["target/time_s"], verdict["target/epochs"] = record["time_s"], record["epoch"]
        best_at = len(top1) - 1 - top1[::-1].index(max(top1))
        if recipe.early_stop_patience and len(top1) - 1 - best_at >= recipe.early_stop_patience:
            verdict.setdefault("stop", f"no better validation top-1 for {recipe.early_stop_patience} epochs "
                                       f"(best {max(top1):.2f}% at epoch {history[best_at]['epoch']})")
        gaps = [h["val/loss"] - h["train/loss"] for h in history[-4:]]
        if len(gaps) == 4 and all(b > a for a, b in zip(gaps, gaps[1:])):
            verdict["warn/overfitting"] = True
            self.say(f"warning: the gap between validation and training loss grew for 3 epochs "
                     f"({gaps[0]:.3f} -> {gaps[-1]:.3f}): the model may be overfitting")
        return verdict

    def replicas_identical(self) -> bool:
        """DDP keeps every rank's weights equal (and validation syncs the BN statistics); check it bit for
        bit once per run, a digest per rank."""
        digests = all_gather_objects(state_digest(self.parts.raw_model))
        if len(set(digests)) != 1:
            self.say("warning: the ranks' weights differ at the end of the run (DDP replicas out of sync)")
        return len(set(digests)) == 1

    def save(self, epoch: int, steps_done: int, epoch_end: bool) -> None:
        """A checkpoint after `steps_done` steps of epoch `epoch` (0-based). Every rank takes part: each
        rank's loader state is its own (its shard, its augmentation stream) and rank 0 stores them all."""
        self.watchdog.progress(f"saving a checkpoint at epoch {epoch + 1} step {steps_done}")
        loader_states = all_gather_objects(self.train_loader.state_dict())
        if not self.env.is_main:
            return
        parts = self.parts
        epochs_done = epoch + 1 if epoch_end else epoch
        step = epoch * self.steps_per_epoch + steps_done
        weights = parts.raw_model.state_dict()
        if not all(t.isfinite().all() for t in weights.values() if t.is_floating_point()):
            # the kept checkpoints must stay good ones, whatever happens next
            self.say(f"not checkpointing at step {step}: the weights hold NaN or inf")
            return
        top1 = [h["val/top1"] for h in self.history]
        is_best = epoch_end and bool(top1) and top1[-1] == max(top1) and self.history[-1]["epoch"] == epoch + 1
        self.store.save(checkpoint_name(epochs_done, step, epoch_end), {
            "epoch": epochs_done,
            "step": step,  # optimizer steps done in all
            "steps_per_epoch": self.steps_per_epoch,
            "model": weights,
            "optimizer": parts.optimizer.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "ema": parts.ema.state_dict() if parts.ema is not None else None,
            "plateau": self.plateau.state_dict(),
            "loader": loader_states,
            "recipe": self.recipe.to_dict(),
            "world_size": self.env.world_size,
            "history": self.history,
            "elapsed_s": self.elapsed(),
        }, best=is_best)

    def restore(self, checkpoint: dict, reshard: bool) -> None:
        """Weights, optimizer, scaler and position; the loader state too unless resharding."""
        same_world = checkpoint["world_size"] == self.env.world_size
        if not same_world and not reshard:
            raise UserError(
                f"the checkpoint was written by {checkpoint['world_size']} processes but this run has "
                f"{self.env.world_size}; resume with {checkpoint['world_size']} processes in all, or pass "
                "--reshard to continue with the new count (the interrupted epoch restarts)"
            )
        self.parts.raw_model.load_state_dict(checkpoint["model"])
        self.parts.optimizer.load_state_dict(checkpoint["optimizer"])
        self.parts.scaler.load_state_dict(checkpoint["scaler"])
        if self.parts.ema is not None and checkpoint.get("ema") is not None:
            self.parts.ema.load_state_dict(checkpoint["ema"])
        if checkpoint.get("plateau"):
            self.plateau.load_state_dict(checkpoint["plateau"])
        self.reached_target = any(h.get("target/epochs") for h in checkpoint["history"])
        self.history = list(checkpoint["history"])
        self.elapsed_before = checkpoint["elapsed_s"]
        self.start_epoch = checkpoint["epoch"]
        if same_world:
            self.start_offset = checkpoint["step"] - checkpoint["epoch"] * checkpoint["steps_per_epoch"]
            self.train_loader.load_state_dict(checkpoint["loader"][self.env.rank])
        self.say(f"resumed at epoch {self.start_epoch + 1}, step {self.start_offset} of {self.steps_per_epoch}"
                 + ("" if same_world else f" (resharded from {checkpoint['world_size']} processes)"))

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        # the first epoch carries start-up costs (allocator, cuDNN autotuning, pipeline warm-up)
        steady = self.history[1:] or self.history
        return {
            "epochs": self.recipe.epochs,
            "epochs_run": len(self.history),
            "final": {k: v for k, v in last.items() if k.startswith("val/")},
            "best/val_top1": max((h["val/top1"] for h in self.history), default=None),
            "best/val_ema_top1": max((h["val_ema/top1"] for h in self.history if "val_ema/top1" in h), default=None),
            # time-to-accuracy (DAWNBench style): run time and epochs to reach --target-top1
            "target": next(({"top1": self.recipe.target_top1, "time_s": h["target/time_s"],
                             "epochs": h["target/epochs"]} for h in self.history if "target/time_s" in h), None),
            "stopped_early": next((h["stop"] for h in self.history if "stop" in h), None),
            "train/img_per_s": sum(h["train/img_per_s"] for h in steady) / len(steady) if steady else None,
            "wall_s": self.elapsed(),
            "world_size": self.env.world_size,
            "global_batch": self.recipe.batch_size * self.env.world_size,
            "peak_lr": self.recipe.peak_lr(self.env.world_size),
            "dataset": {"train_images": self.train_loader.num_samples,
                        "val_images": self.val_loader.num_samples},
            "recipe": self.recipe.to_dict(),
            "environment": environment(),
        }


def find_resume(args: argparse.Namespace, say) -> dict | None:
    if args.resume is None:
        return None
    if args.resume == "auto":
        found = latest_checkpoint(args.out, say) if args.out.is_dir() else None
        if found is None:
            say(f"--resume auto: no checkpoint in {args.out}; starting from the beginning")
            return None
        say(f"--resume auto: continuing from {found[0]}")
        return found[1]
    return load_checkpoint(Path(args.resume))


def run(args: argparse.Namespace) -> dict:
    env = init_distributed(args.device)
    watchdog = Watchdog(env.rank, env.world_size, args.hang_timeout)
    # from the start, so a stop signal during start-up is honoured at the first step (one process: checked
    # every step; several: every 10, a tiny gloo all-reduce)
    stop = StopRequest(check_every=1 if env.world_size == 1 else 10)
    try:
        return run_with(args, env, watchdog, stop)
    except (UserError, Preempted, Diverged):
        raise
    except Exception:
        if env.distributed:  # the traceback follows; first say which rank and where, for the job log
            print(f"failed: {watchdog.describe()}", file=sys.stderr, flush=True)
        raise
    finally:
        watchdog.close()
        stop.close()


def run_with(args: argparse.Namespace, env: DistEnv, watchdog: Watchdog, stop: StopRequest) -> dict:
    say = (lambda text: print(text, flush=True)) if env.is_main else (lambda text: None)
    watchdog.progress("starting: reading the checkpoint")
    checkpoint = find_resume(args, say)
    # a resumed run continues the saved recipe; flags given now still override single fields
    base = from_mapping(checkpoint["recipe"]) if checkpoint else None
    recipe = recipe_from_args(args, base)
    prepare_out_dir(args.out, resuming=args.resume is not None)
    if env.is_main:
        print(f"recipe{f' (preset {args.preset})' if args.preset else ''}:\n" + format_recipe(recipe), flush=True)
    watchdog.progress("starting: listing and checking the data, building the loaders")
    train_loader, val_loader = build_loaders(recipe, args.data, env, args.manifest)
    watchdog.progress("starting: building the model")
    parts = build_training(recipe, train_loader.num_classes, env)
    trainer = Trainer(recipe, parts, train_loader, val_loader, env, args.out, args, watchdog, stop)
    if checkpoint:
        trainer.restore(checkpoint, args.reshard)
    if env.is_main:
        recipe.save(args.out / "recipe.json", world_size=env.world_size,
                    global_batch=recipe.batch_size * env.world_size, peak_lr=recipe.peak_lr(env.world_size),
                    amp_in_use=str(parts.amp_dtype).removeprefix("torch.") if parts.amp_dtype else None)
    summary = trainer.run()
    summary["data"] = str(args.data.resolve())
    if env.is_main:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_report(summary, args.out)
    return summary


def print_report(summary: dict, out: Path) -> None:
    final = summary["final"]
    lines = [
        "",
        f"run folder        {out}",
        f"processes         {summary['world_size']} (global batch {summary['global_batch']}, peak LR {summary['peak_lr']:.4g})",
        f"throughput        {summary['train/img_per_s']:.1f} img/s in all, "
        f"{summary['train/img_per_s'] / summary['world_size']:.1f} per process",
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
            print(f"stopped by {stop}: checkpoint saved; run the same command with --resume auto to continue",
                  file=sys.stderr, flush=True)
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
