"""A run's life in its folder: start-up, resume and the run folder's files.

Owns what rn50.train does before the first step and after the last: finding the checkpoint to resume from
(`--resume PATH|auto`: `find_resume`, called at rn50.train's door, which then resolves the configuration
over the checkpoint's recipe), the resume guard (which recipe changes a resume accepts), the checks of the
training file list, the world size, the architecture of --finetune-from weights and --weights' file (found or
fetched: rn50.core.pretrained), finished-run detection, preparing (and on a failed start cleaning up) the run
folder, where a resumed run continues, and the files recipe.json, machine.json and summary.json. Every check
here runs before anything is written into the run folder: a failed start-up is one line, exit 2, and leaves the
folder as it found it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.registry import REGISTRY
from rn50.config.describe import changes_from_defaults, epoch_plan
from rn50.config.errors import UserError
from rn50.config.machine import Machine, process_cores, unusable_requests
from rn50.config.recipe import MACHINE_FIELDS, RECIPE_FIELDS, Config, Recipe, did_you_mean, get, resolve, with_fields
from rn50.core.loaders import data_identity
from rn50.core import pretrained
from rn50.core.model import arch_of_weights, read_weights_file
from rn50.core.step import check_cuda_only_settings
from rn50.observe import tracking
from rn50.observe.profiling import check_flags
from rn50.reliability.checkpoint import (latest_checkpoint, load_checkpoint, regular_checkpoints,
                                         remove_stale_temporaries)
from rn50.system.dist import DistEnv

# --- the resume guard ---------------------------------------------------------------------------------

# Changes a resumed run makes without --allow-change: they do not alter what any step already taken means,
# nor the data stream, so the run continues at the exact step. The stopping rules only decide when to stop.
SAFE_ON_RESUME = ("early_stop_patience", "target_top1")
# The LR schedule's numbers: the LR is a pure function of (schedule, peak LR, step) (rn50.core.schedule.lr_at),
# so a new value changes the LR of the steps to come only (lowering the LR after a divergence, a longer run).
# Not `schedule` (the kind): the plateau multiplier's state carries over and means nothing to another kind.
SCHEDULE_ON_RESUME = ("base_lr", "base_batch", "lr_scaling", "epochs", "warmup_epochs", "warmup_start_factor",
                      "lr_milestones", "lr_decay", "min_lr", "cooldown_epochs", "plateau_factor", "plateau_patience")
# The clipping threshold, likewise: it bounds the updates of the steps to come and changes neither a step done nor
# the data stream (turning clipping on or lowering it after a loss spike is a fix, as lowering the LR is).
# Not accum_steps: like batch_size it changes the global batch, so the data stream and the peak LR; refused unless
# --allow-change names it (then the interrupted epoch restarts).
CLIPPING_ON_RESUME = ("clip_grad_norm",)


def changes_on_resume(saved: Recipe, now: Recipe) -> list[tuple[str, object, object]]:
    """Fields that differ between the checkpoint's recipe and this run's, except the safe ones and the
    schedule's (schedule_changes)."""
    accepted = SAFE_ON_RESUME + SCHEDULE_ON_RESUME + CLIPPING_ON_RESUME
    return [(flat, get(saved, flat), get(now, flat)) for flat in RECIPE_FIELDS
            if get(saved, flat) != get(now, flat) and flat not in accepted]


def schedule_changes(saved: Recipe, now: Recipe, epochs_done: int) -> str | None:
    """The one start-up line naming the LR schedule's and the clipping's changes (old -> new), or None. Fewer
    epochs than the checkpoint has done cannot be undone: one line."""
    if now.schedule.epochs < epochs_done:
        raise UserError(f"the checkpoint has {epochs_done} epochs done but this run asks for --epochs "
                        f"{now.schedule.epochs}; pass --epochs {epochs_done} or more")
    differ = [flat for flat in SCHEDULE_ON_RESUME + CLIPPING_ON_RESUME if get(saved, flat) != get(now, flat)]
    changed = [f"{flat} {get(saved, flat)!r} -> {get(now, flat)!r}" for flat in differ]
    what = " and ".join(name for name, group in (("the LR", SCHEDULE_ON_RESUME), ("the clipping", CLIPPING_ON_RESUME))
                        if set(differ) & set(group))
    return (f"changed on resume: {', '.join(changed)} ({what} of the steps to come; the steps done and the data "
            "stream stay as they were)") if changed else None


# Fields no resume can change: the checkpoint's weights fit its own architecture only. --allow-change does
# not take them (another architecture is a new run: a new --out, --finetune-from for weights that fit).
NEVER_ON_RESUME = ("arch",)
# --allow-change also takes `data`: another list of training files than the checkpoint's (rn50.train checks
# it); the interrupted epoch then restarts, since the loader's position belongs to the old list.
DATA_CHANGE = "data"


def guard_resume(saved: Recipe, now: Recipe, allowed: str | None) -> list[str]:
    """Refuse a resume that changes the meaning of a step, unless each such field is named in --allow-change;
    a change of a NEVER_ON_RESUME field is refused whatever it names. Returns the allowed changes, for the log."""
    allowed_names = {n.strip() for n in (allowed or "").split(",") if n.strip()}
    for name in allowed_names - {DATA_CHANGE}:
        if name not in RECIPE_FIELDS:
            hint = " (a machine setting: it may change freely)" if name in MACHINE_FIELDS else did_you_mean(name, RECIPE_FIELDS)
            raise UserError(f"--allow-change names {name!r}, which is not a recipe field{hint}")
    changed = changes_on_resume(saved, now)
    for flat, before, after in changed:
        if flat in NEVER_ON_RESUME:
            raise UserError(f"the checkpoint holds {flat} {before} weights but this run asks for {flat} {after}: "
                            f"another {flat} is a new run, not a resume; resume with {flat} {before} (drop "
                            f"--{flat.replace('_', '-')}), or start a new run with a new --out")
    refused = [(f, a, b) for f, a, b in changed if f not in allowed_names]
    if refused:
        flat, before, after = refused[0]
        more = f" (and {', '.join(f for f, _, _ in refused[1:])})" if len(refused) > 1 else ""
        raise UserError(f"the checkpoint was trained with {flat} = {before!r} but this run asks for {after!r}{more}; "
                        f"resume with the same value, or pass --allow-change {','.join(f for f, _, _ in refused)} "
                        "to continue with the new one")
    return [f"{f}: {a!r} -> {b!r}" for f, a, b in changed]



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




def elastic_launch() -> bool:
    """Started by torchrun's elastic agent (a restart, a membership change of --nnodes MIN:MAX, or a first
    start): there a new world size is an elastic change, accepted without --reshard."""
    return os.environ.get("TORCHELASTIC_RUN_ID") is not None


def check_world_size(checkpoint: dict, env: DistEnv, reshard: bool) -> None:
    if checkpoint["world_size"] != env.world_size and not reshard and not elastic_launch():
        raise UserError(
            f"the checkpoint was written by {checkpoint['world_size']} process"
            f"{'es' if checkpoint['world_size'] != 1 else ''} but this run has {env.world_size}; resume with "
            f"{checkpoint['world_size']} process{'es' if checkpoint['world_size'] != 1 else ''} in all, or pass "
            "--reshard to continue with the new count"
        )


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: the epoch, and within it the step, this rank's loader state and loss
    sums when the data stream is the same one; otherwise the interrupted epoch restarts."""
    epoch: int
    offset: int
    loader_state: dict | None
    losses: dict | None
    fresh_optimizer: bool  # another optimizer than the checkpoint's (allowed on resume): its state starts fresh
    note: str  # the start-up line that says where the run continues


def resume_point(checkpoint: dict, saved: Recipe, recipe: Recipe, loader: str, env: DistEnv,
                 steps_per_epoch: int, exact: bool, train_images: int | None = None) -> ResumePoint:
    """`exact`: no recipe change and the same training file list. The stream is the same when the world
    size, the loader and the epoch's length are too (an epoch of another length, a new batch or file count,
    is another stream: its offset means nothing here).

    Another world size (an elastic change, or --reshard) with an elastic loader (the registry's `elastic`: one global order whatever the world size) and an exact
    resume continues the interrupted epoch: the old group consumed the epoch's global slots [0, consumed)
    (pipelines.order), the new one splits the rest into whole global batches (the tail short of one is
    dropped, as an uninterrupted epoch drops it) and numbers them so that the epoch ends at its usual step,
    `steps_per_epoch`: the LR schedule, a function of the fractional epoch, goes on where it was."""
    same_world = checkpoint["world_size"] == env.world_size
    fresh_optimizer = saved.optimisation.optimizer != recipe.optimisation.optimizer
    same_kind = checkpoint.get("loader_kind", loader) == loader
    same_stream = same_world and exact and same_kind and checkpoint["steps_per_epoch"] == steps_per_epoch
    elastic = (not same_world and exact and same_kind and REGISTRY[loader].elastic and train_images is not None)
    epoch, offset, loader_state, losses = checkpoint["epoch"], 0, None, None
    before = checkpoint["world_size"]
    old_offset = checkpoint["step"] - checkpoint["epoch"] * checkpoint["steps_per_epoch"]
    moved = ""
    if same_stream:
        offset = old_offset
        loader_state = checkpoint["loader"][env.rank]
        losses = (checkpoint.get("epoch_losses") or [None] * env.world_size)[env.rank]
    elif elastic and old_offset > 0:
        old, accum = checkpoint["loader"][0], recipe.optimisation.accum_steps
        batch = recipe.optimisation.batch_size * accum  # an optimizer step's images on each process
        # offsets count optimizer steps, the loader's position and `first` its batches, accum_steps to a step (the
        # same K before and after: an exact resume changed no recipe field)
        consumed = old.get("start", 0) + (old_offset - old.get("first", 0) // accum) * batch * before
        rest = max(0, train_images - consumed) // (batch * env.world_size)
        offset = steps_per_epoch - rest
        loader_state = {"epoch": checkpoint["epoch"], "position": offset * accum, "start": consumed,
                        "first": offset * accum}
        moved = (f"; {consumed} of {train_images} images of the epoch done, the other "
                 f"{train_images - consumed} over {env.world_size} process{'es' if env.world_size != 1 else ''}: "
                 f"{rest} step{'s' if rest != 1 else ''}"
                 + (f", the last {train_images - consumed - rest * batch * env.world_size} dropped (short of a "
                    "global batch)" if train_images - consumed - rest * batch * env.world_size else ""))
    note = (f"resumed at epoch {epoch + 1}, step {offset} of {steps_per_epoch}"
            + ("" if same_world else f" (resharded from {before} process{'es' if before != 1 else ''}{moved})")
            + (" (the data stream changed: the epoch restarts)"
               if not same_stream and not elastic and (same_world or old_offset) else "")
            + (f"; the optimizer changed ({saved.optimisation.optimizer} -> {recipe.optimisation.optimizer}): its "
               "state starts fresh" if fresh_optimizer else ""))
    return ResumePoint(epoch, offset, loader_state, losses, fresh_optimizer, note)


# --- --finetune-from ----------------------------------------------------------------------------------

def finetune_arch(recipe: Recipe, given: frozenset[str] | set[str] | tuple = ()) -> tuple[Recipe, str | None]:
    """--finetune-from: the architecture the weights hold (rn50.core.model.arch_of_weights), checked at start-up.
    Unless a preset or flag set `arch` (`given`: Config.given) it becomes the run's, with a note; a different
    --arch is one line."""
    path = recipe.model.finetune_from
    if not path:
        return recipe, None
    loaded = read_weights_file(path)
    found = arch_of_weights(loaded["model"] if isinstance(loaded.get("model"), dict) else loaded)
    if found is None or found == recipe.model.arch:
        return recipe, None  # weights that fit no ResNet are named by build_training's load, with the detail
    if "arch" in given:
        raise UserError(f"--finetune-from {path} holds {found} weights but this run's arch is {recipe.model.arch}; "
                        f"drop --arch (the weights say which) or pass --arch {found}")
    return with_fields(recipe, arch=found), f"arch {found}: read from --finetune-from {path}"


# --- the run folder -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resume:
    """The checkpoint a run continues from, found before its configuration is resolved (rn50.train's door):
    its path and state, its recipe, the job note of a failed attempt that torchrun restarted
    (rn50.reliability.restart), and the lines to say once start-up has passed its checks. All None: a start."""
    path: Path | None = None
    checkpoint: dict | None = None
    saved: Recipe | None = None  # the checkpoint's recipe
    job: dict | None = None
    notes: tuple[str, ...] = ()


def find_resume(out: Path, resume: str | None, job: dict | None = None) -> Resume:
    """The checkpoint --resume names (PATH, or `auto`: the newest valid one in the run folder), its state and
    its recipe. `job`: the failed attempt's note, where torchrun restarted the job."""
    notes: list[str] = []
    if resume is None:
        return Resume(job=job)
    if resume == "auto":
        refused: list[tuple[Path, str]] = []
        found = latest_checkpoint(out, notes.append, refused) if out.is_dir() else None
        if found is None and refused:  # starting afresh would retrain into a run folder that holds a run
            newest, why = refused[0]
            raise UserError((f"--resume auto: the only checkpoint of {out}, {newest.name}, " if len(refused) == 1
                             else f"--resume auto: none of the {len(refused)} checkpoints of {out} can be used; the "
                             f"newest, {newest.name}, ") + f"is unreadable: {why}; restore that file (from a copy), or "
                            "start afresh with a new --out")
        if found is None:
            return Resume(job=job, notes=(*notes, f"--resume auto: no checkpoint in {out}; starting from the "
                                                  "beginning"))
        notes.append(f"--resume auto: continuing from {found[0]}")
        path, checkpoint = found
    else:
        path, checkpoint = Path(resume), load_checkpoint(Path(resume))
    return Resume(path, checkpoint, resolve(saved=checkpoint["recipe"]).recipe, job, tuple(notes))


def finished(checkpoint: dict, saved: Recipe, recipe: Recipe, out: Path) -> bool:
    """The checkpoint ends a run that wrote its summary: every epoch done, or stopped early by rules that
    have not changed since (a longer --epochs, or new stopping rules, continue it)."""
    history = checkpoint["history"]
    stopped = bool(history) and "stop" in history[-1] and history[-1]["epoch"] == checkpoint["epoch"]
    return (out / "summary.json").is_file() and (
        checkpoint["epoch"] >= recipe.schedule.epochs or (stopped and saved.stopping == recipe.stopping))


def prepare_out_dir(out: Path, resuming: bool, is_main: bool) -> list[str]:
    """Check that the run folder can take this run; returns what was cleaned up, for the start-up lines."""
    kept = regular_checkpoints(out)
    if not resuming and ((out / "metrics.jsonl").exists() or kept):  # a stop before the first log line: checkpoints
        if (out / "summary.json").is_file():
            raise UserError(f"{out} already holds a finished run (summary.json); pass a new --out, or add "
                            "--resume auto and a larger --epochs to train it longer")
        raise UserError(f"{out} already holds an unfinished run (" + (f"its newest checkpoint: {kept[-1].name}"
                        if kept else "no checkpoint yet") + "); to continue it, run the same command with "
                        "--resume auto; to start a new run, pass a new --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # a unique name: every rank probes at once
    except OSError as exc:
        raise UserError(f"cannot write to the run folder {out} ({exc.strerror}); pass a writable --out") from None
    if not is_main:
        return []
    return removed_temporaries(out)


def removed_temporaries(out: Path) -> list[str]:
    """A checkpoint write killed midway leaves its temporary file (checkpoint-sized) behind: removed, and said."""
    return [f"removed {stale.name}, left by a checkpoint write that never finished"
            for stale in remove_stale_temporaries(out)]


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


def write_run_files(config: Config, env: DistEnv, amp_dtype, weights: dict | None = None) -> None:
    """recipe.json (with what the world size makes of it, and what the run started from: Start.weights) and
    machine.json; rank 0 only."""
    if not env.is_main:
        return
    recipe, out, world = config.recipe, config.run.out, env.world_size
    recipe.save(out / "recipe.json", world_size=world, global_batch=recipe.optimisation.global_batch(world),
                peak_lr=recipe.optimisation.peak_lr(world),
                amp_in_use=str(amp_dtype).removeprefix("torch.") if amp_dtype else None, **(weights or {}))
    (out / "machine.json").write_text(json.dumps(config.machine.to_dict(), indent=2) + "\n")


def write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def reached(peak: float, top: float) -> str:
    """", reached only X": the LR the run reaches, where a warm-up outlasts it (nothing otherwise)."""
    return f", reached only {top:.4g}: the warm-up outlasts the run" if top < peak else ""


def rate(img_per_s: float | None) -> str:
    """img/s for a console line ("n/a": no timed step)."""
    return "n/a" if img_per_s is None else f"{img_per_s:.1f}"


def print_report(summary: dict, out: Path) -> None:
    """The run's closing lines on the console: where its files are, its throughput and its validation."""
    final = summary["final"]
    lines = [
        "",
        f"run folder        {out}",
        f"processes         {summary['world_size']} (global batch {summary['global_batch']}, peak LR {summary['peak_lr']:.4g}"
        + reached(summary["peak_lr"], summary.get("peak_lr_reached", summary["peak_lr"])) + ")",
        f"throughput        {rate(summary['train/img_per_s'])} img/s in all, "
        f"{rate(summary['train/img_per_s'] and summary['train/img_per_s'] / summary['world_size'])} per process",
        f"validation        top-1 {final.get('val/top1', math.nan):.2f}%  top-5 {final.get('val/top5', math.nan):.2f}%"
        f"  on {final.get('val/count')} of {summary['dataset']['val_images']} images",
        f"wall time         {summary['wall_s']:.1f} s",
    ]
    print("\n".join(lines), flush=True)


def startup_summary(config: Config, machine: Machine, num_classes: int) -> list[str]:
    """A few lines on what this run does that the defaults do not; the whole recipe is in recipe.json.
    `machine`: as given (`loader auto` is a default, not a change)."""
    recipe, out, presets = config.recipe, config.run.out, ",".join(config.presets)
    changed = changes_from_defaults(recipe, machine)
    lines = [f"recipe{f' (presets {presets})' if presets else ''}: "
             + (f"the 90-epoch defaults except {', '.join(changed)}" if changed else "the 90-epoch defaults")
             + f"; all of it in {out / 'recipe.json'}"]
    kd = recipe.distillation
    if kd.teacher:
        lines.append(f"distilling from {kd.teacher} ({kd.teacher_arch}): loss = {kd.alpha:g} x T^2 x "
                     f"KL(teacher || student) at T = {kd.temperature:g} + {1 - kd.alpha:g} x cross-entropy")
    if not REGISTRY[config.machine.loader].reads_images:  # the concrete loader (`machine` may say auto)
        lines.append(f"synthetic data: validation runs on other random images with random labels, so its top-1 "
                     f"stays near chance ({100 / num_classes:.2g}%); this run measures speed, not learning")
    unusable = unusable_requests(config.machine, config.given, *process_cores())  # a preset's 8 threads on 2 cores
    return lines + ([unusable] if unusable else [])


# --- start-up -----------------------------------------------------------------------------------------

@dataclass
class Start:
    """What start-up settled: the configuration (its machine's `loader auto` made concrete for this
    process's device), the checkpoint to resume from and what it allows, and the start-up lines so far."""
    config: Config
    machine_given: Machine  # the machine settings as resolved, before `auto` was made concrete
    checkpoint: dict | None = None
    saved: Recipe | None = None  # the checkpoint's recipe
    exact: bool = True  # no recipe change and the same training files: the loader's position carries over
    identity: dict | None = None  # the training file list (rn50.core.loaders.data_identity), for checkpoints
    notes: list[str] = field(default_factory=list)
    finished: dict | None = None  # the summary of a run that is already done: nothing to train
    weights: dict = field(default_factory=dict)  # what the run started from (rn50.core.pretrained.at_start)


def start(config: Config, resume: Resume, env: DistEnv, say) -> Start:
    """Every start-up check, in order, before anything is written: the resume guard, --finetune-from's
    architecture, the training file list, the device-only settings, the profiler, the tracker, --weights' file
    (rn50.core.pretrained), a finished run, the world size; then prepare the run folder. `config`: resolved at
    the door, over the checkpoint's recipe where resuming (`resume`: what rn50.train's door found)."""
    notes = list(resume.notes)  # start-up lines wait until every check has passed: an error found there comes alone
    checkpoint_path, checkpoint, saved = resume.path, resume.checkpoint, resume.saved
    run, recipe, given = config.run, config.recipe, config.machine
    machine = given.for_device(env.device.type)  # --loader auto made concrete
    if given.loader != machine.loader:
        notes.append(f"loader auto: {machine.loader} (this process runs on {env.device})")
    changes = guard_resume(saved, recipe, run.allow_change) if saved else []
    recipe, arch_note = finetune_arch(recipe, config.given) if not saved else (recipe, None)
    config = dataclasses.replace(config, recipe=recipe, machine=machine)
    identity = data_identity(run.data, run.manifest, machine.loader)
    same_data, data_notes = check_data(checkpoint, identity, run.allow_change) if checkpoint else (True, [])
    check_cuda_only_settings(recipe, machine, env.device)
    check_flags(run.profile_steps, run.profiler, env.device)
    tracking.check_available(machine.tracker)  # a missing extra is a start-up error, not a lost run
    # --weights' file, fetched where missing and the network works (else one line); last: a download is slow
    weights, weights_notes = pretrained.at_start(recipe.model, env, checkpoint["recipe"] if checkpoint else None)
    if checkpoint and finished(checkpoint, saved, recipe, run.out):
        # the run's own files stay as they are; a killed checkpoint write's temporary file is no part of them
        for line in removed_temporaries(run.out) if env.is_main else []:
            say(line)
        stop = checkpoint["history"][-1].get("stop") if checkpoint["history"] else None
        say(f"{run.out} holds a finished run ({checkpoint_path.name}: {checkpoint['epoch']} of "
            f"{saved.schedule.epochs} epochs{f'; stopped early: {stop}' if stop else ''}): nothing to do, its "
            "files are left as they are. To train longer, add a larger --epochs; to start again, pass a new --out")
        return Start(config, given, finished=json.loads((run.out / "summary.json").read_text()))
    schedule_note = schedule_changes(saved, recipe, checkpoint["epoch"]) if checkpoint else None  # stays exact
    if checkpoint:
        check_world_size(checkpoint, env, run.reshard)
    notes += prepare_out_dir(run.out, resuming=run.resume is not None, is_main=env.is_main)
    notes += data_notes + ([arch_note] if arch_note else []) + weights_notes
    notes += config.overridden + [f"changed on resume: {change}" for change in changes]
    notes += ([schedule_note] if schedule_note else []) + epoch_plan(recipe)
    return Start(config, given, checkpoint, saved, not changes and same_data, identity, notes, weights=weights)
