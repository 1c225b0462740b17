"""One recipe in typed sections: 90-epoch defaults, layered presets, flat CLI flags, strict names, machine
settings kept apart, the resume guard, and the saved resolution."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from rn50.config.errors import UserError
from rn50.reliability.lifecycle import guard_resume
from rn50.config.recipe import (MACHINE_FIELDS, RECIPE_FIELDS, Recipe, available_presets, read_preset, resolve, with_fields)
from rn50.config.machine import Machine
from rn50.config.cli import add_recipe_flags, parse_strict
from rn50.config.describe import format_recipe

FLAT_PRESETS = Path(__file__).parents[1] / "data" / "flat-presets"  # the presets as they were before sections


def parse(argv):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_recipe_flags(parser)
    return resolve(parse_strict(parser, argv))


def test_defaults_are_the_90_epoch_recipe():
    r = Recipe()
    o, s, reg, a = r.optimisation, r.schedule, r.regularisation, r.augmentation
    assert (s.epochs, o.batch_size, o.base_lr, o.base_batch) == (90, 256, 0.1, 256)
    assert (o.momentum, o.nesterov, o.weight_decay, reg.label_smoothing) == (0.9, True, 1e-4, 0.1)
    assert (s.warmup_epochs, s.lr_milestones, s.lr_decay, s.kind) == (5.0, (30.0, 60.0, 80.0), 0.1, "step")
    assert r.precision.amp and r.precision.amp_dtype == "float16" and r.precision.channels_last
    assert r.model.zero_init_residual and (a.image_size, a.color_jitter) == (224, 0.4)
    assert (a.crop_area, a.crop_ratio, a.hflip, a.val_resize_ratio) == ((0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.875)
    assert Machine().loader == "auto"  # dali with CUDA, dali-cpu without (issue 23, 3.8)


def test_sections_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Recipe().optimisation.batch_size = 8


def test_every_field_is_a_flat_flag_and_overrides_one_field():
    resolved = parse(["--batch-size", "64", "--lr-milestones", "10,20", "--no-amp", "--color-jitter", "0",
                      "--arch", "resnet18", "--schedule", "cosine", "--kd-alpha", "0.5", "--dali-threads", "3"])
    r = resolved.recipe
    assert (r.optimisation.batch_size, r.schedule.lr_milestones, r.precision.amp) == (64, (10.0, 20.0), False)
    assert (r.augmentation.color_jitter, r.model.arch, r.schedule.kind) == (0.0, "resnet18", "cosine")
    assert r.distillation.alpha == 0.5 and resolved.machine.dali_threads == 3
    assert r.schedule.epochs == 90  # untouched fields keep the recipe


def test_machine_settings_are_not_recipe_fields():
    assert {"loader", "device", "dali_threads", "workers", "prefetch", "hw_decoder_load", "log_every"} \
        <= set(MACHINE_FIELDS)
    assert not set(MACHINE_FIELDS) & set(RECIPE_FIELDS)
    assert "dali_threads" not in json.dumps(Recipe().to_dict())


def test_presets_layer_left_to_right_and_report_what_a_later_one_overrides(tmp_path):
    resolved = resolve({"preset": "rtx3090x4,smoke"})
    assert resolved.recipe.optimisation.batch_size == 192 and resolved.recipe.schedule.epochs == 4
    assert resolved.machine.dali_threads == 6 and resolved.machine.log_every == 10
    assert resolved.overridden == []  # the two set different fields
    (tmp_path / "big.toml").write_text("[optimisation]\nbatch_size = 256\n")
    resolved = resolve({"preset": f"rtx3090x4,{tmp_path / 'big.toml'}"})
    assert resolved.recipe.optimisation.batch_size == 256
    assert len(resolved.overridden) == 1 and "batch_size 192 -> 256" in resolved.overridden[0]
    flags = parse(["--preset", "smoke,rtx3090x4", "--epochs", "7"]).recipe
    assert flags.schedule.epochs == 7 and flags.optimisation.batch_size == 192  # flags over every preset


def test_python_m_rn50_recipe_prints_the_presets_resolved(monkeypatch, capsys):
    """The command users run to see a recipe without training (docs/presets.md), its presets read from
    rn50/presets/ (where users find and edit them)."""
    import runpy
    import sys

    assert {"smoke", "rtx3090x4", "h100x8", "ffcv_16_epochs"} <= set(available_presets())
    monkeypatch.setattr(sys, "argv", ["rn50.recipe", "--preset", "rtx3090x4,smoke"])
    runpy.run_module("rn50.recipe", run_name="__main__")
    printed = capsys.readouterr().out
    assert "batch_size = 192" in printed and "\nepochs = 4" in printed, printed


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_loads_and_validates_through_python_m_rn50_recipe(name, monkeypatch, capsys, tmp_path):
    """Issue 40: each preset in rn50/presets/ resolves and validates through the command users run to check one
    (`python -m rn50.recipe --preset NAME`, which exits 2 with one line on an invalid value), and what it prints
    reads back as the same recipe."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["rn50.recipe", "--preset", name])
    runpy.run_module("rn50.recipe", run_name="__main__")  # a UserError or SystemExit fails the test
    (tmp_path / "printed.toml").write_text(capsys.readouterr().out)
    assert resolve({"preset": str(tmp_path / "printed.toml")}).recipe == resolve({"preset": name}).recipe


# the published recipes: preset -> (its reported top-1, GPUs it is written for, peak LR there, global batch there)
PUBLISHED = {"torchvision_v2": ("80.858%", 8, 0.5, 1024), "rsb_a1": ("80.4%", 8, 5e-3, 2048),
             "rsb_a2": ("79.8%", 8, 5e-3, 2048), "rsb_a3": ("78.1%", 8, 8e-3, 2048),
             "kd_lamb_610": ("81.9%", 8, 5e-3, 1536)}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_recipes_cite_their_source_and_top1_and_give_its_lr_at_its_batch(name):
    """Issue 40, 6: each cites where it comes from and the top-1 reported there, says which fields it cannot match,
    and on the GPU count it is written for gives the source's global batch and LR."""
    from rn50.config.recipe import PRESET_DIR

    top1, gpus, peak, batch = PUBLISHED[name]
    comment = "\n".join(line for line in (PRESET_DIR / f"{name}.toml").read_text().splitlines() if line.startswith("#"))
    assert top1 in comment and "https://" in comment and "cannot match field for field" in comment, name
    o = resolve({"preset": name}).recipe.optimisation
    assert o.global_batch(gpus) == batch and o.peak_lr(gpus) == pytest.approx(peak)


def test_the_published_recipes_fields_as_their_sources_give_them():
    """The values that make each recipe what it is (the comments give the sources)."""
    tv = resolve({"preset": "torchvision_v2"}).recipe
    a, s, r = tv.augmentation, tv.schedule, tv.regularisation
    assert (a.image_size, a.val_size, a.val_resize_to, a.trivial_augment, a.random_erase, a.repeated_aug) == \
        (176, 224, 232, True, 0.1, 3)
    assert (s.epochs, s.kind, s.warmup_epochs, s.warmup_start_factor, tv.optimisation.nesterov) == \
        (600, "cosine", 5.0, 0.01, False)
    assert (r.label_smoothing, r.mixup_alpha, r.cutmix_alpha, tv.optimisation.weight_decay) == (0.1, 0.2, 1.0, 2e-5)
    assert r.ema_decay ** 32 == pytest.approx(1 - (1 - 0.99998) * 1024 * 32 / 600, abs=1e-7)  # torchvision's EMA
    for name, epochs, magnitude, repeats, mixup, decay in (("rsb_a1", 600, 21, 3, 0.2, 0.01),
                                                           ("rsb_a2", 300, 21, 3, 0.1, 0.02),
                                                           ("rsb_a3", 100, 18, 1, 0.1, 0.02)):
        rsb = resolve({"preset": name}).recipe
        assert (rsb.schedule.epochs, rsb.augmentation.randaugment_magnitude, rsb.augmentation.repeated_aug,
                rsb.regularisation.mixup_alpha, rsb.optimisation.weight_decay) == (epochs, magnitude, repeats, mixup,
                                                                                   decay), name
        assert (rsb.optimisation.optimizer, rsb.optimisation.lr_scaling, rsb.regularisation.label_smoothing,
                rsb.augmentation.val_resize_to) == ("lamb", "sqrt", 0.0, 235), name
    a3 = resolve({"preset": "rsb_a3"}).recipe.augmentation
    assert (a3.image_size, a3.val_size) == (160, 224)


def test_python_m_rn50_recipe_into_a_closed_pipe_ends_without_a_traceback(tmp_path):
    """Issue 38, 7: `python -m rn50.recipe | head -1` ended in a BrokenPipeError traceback. A pipe whose reader is
    gone before the first write (what `head -1` leaves) ends it quietly, exit 141 (128 + SIGPIPE, as `cat` ends)."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "rn50.recipe", "--preset", "smoke"], stdout=write,
                              stderr=subprocess.PIPE, cwd=Path(__file__).parents[2], timeout=120)
    finally:
        os.close(write)
    assert done.stderr.decode() == "" and done.returncode == 141, done.stderr.decode()[-2000:]
    err = tmp_path / "err"  # the acceptance check's own pipeline: `python -m rn50.recipe 2>err | head -1`
    shell = subprocess.run(f"'{sys.executable}' -m rn50.recipe 2>'{err}' | head -1 >/dev/null; cat '{err}'", shell=True,
                           capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=120)
    assert "Traceback" not in shell.stdout + shell.stderr, shell.stdout + shell.stderr


def test_machine_settings_this_machine_cannot_use_as_asked_are_said_at_start_up(monkeypatch):
    """Issue 38, 7: `--preset h100x8` in one CPU process set 8 DALI threads on 2 cores (and the hardware decoder's
    share for a CPU decoder) without a word. One start-up line now; nothing for what nobody asked for."""
    import dataclasses
    import os

    from rn50.config.machine import unusable_requests
    from rn50.config.run_settings import RunSettings
    from rn50.reliability.lifecycle import startup_summary

    h100 = resolve({"preset": "h100x8", "data": Path("d"), "out": Path("o")}, run=RunSettings)
    on_cpu = dataclasses.replace(h100, machine=h100.machine.for_device("cpu"))
    note = unusable_requests(on_cpu.machine, on_cpu.given, cores=2)
    assert note == ("note: asked for, not usable as asked here: dali_threads = 8 on 2 cores: the threads take turns, "
                    "so --dali-threads 2 does as much; hw_decoder_load = 0.9: the dali-cpu loader decodes on the "
                    "CPU, without the hardware JPEG decoder")
    assert unusable_requests(h100.machine.for_device("cuda"), h100.given, cores=112, local_ranks=8) is None
    assert "dali_threads = 8 on 7 cores (56 over 8 processes on this node)" in unusable_requests(
        h100.machine.for_device("cuda"), h100.given, cores=56, local_ranks=8)  # half a DGX H100
    default = resolve({"loader": "dali-cpu"})  # the default 4 threads on 2 cores: not asked for, not said
    assert unusable_requests(default.machine, default.given, cores=2) is None
    tv = resolve({"loader": "torchvision", "dali_threads": 4, "workers": 6})
    assert unusable_requests(tv.machine, tv.given, cores=4) == (
        "note: asked for, not usable as asked here: dali_threads = 4: the torchvision loader runs no DALI threads; "
        "workers = 6 processes on 4 cores: they take turns, so --workers 4 does as much")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert startup_summary(on_cpu, h100.machine, 1000)[-1] == note


@pytest.mark.parametrize("name", [n for n in available_presets() if (FLAT_PRESETS / f"{n}.toml").exists()])
def test_every_preset_loads_and_matches_its_flat_form(name):
    """The presets moved to section tables; the flat form they had still loads, to the same values (presets
    written after the move have no flat form: tests/component/test_time_to_accuracy.py checks the budget presets)."""
    sectioned = read_preset(name)
    assert sectioned == read_preset(str(FLAT_PRESETS / f"{name}.toml"))
    resolved = resolve({"preset": name})
    for flat, value in sectioned.items():
        owner = resolved.machine if flat in MACHINE_FIELDS else None
        assert (getattr(owner, flat) if owner else _get(resolved.recipe, flat)) == value


FFCV_SHARED = {  # ffcv_base.toml: what the six budgets share (FFCV's rn50_*_epochs.yaml)
    "blurpool": True, "image_size": 160, "min_res": 160, "max_res": 192, "val_image_size": 256, "val_flip": True,
    "color_jitter": 0.0, "batch_size": 512, "base_lr": 1.7, "base_batch": 4096, "nesterov": False,
    "weight_decay": 0.0001, "warmup_epochs": 2.0, "schedule": "linear", "label_smoothing": 0.1}
FFCV_BUDGETS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}


@pytest.mark.parametrize("epochs", FFCV_BUDGETS)
def test_ffcv_presets_are_their_base_and_the_values_that_differ(epochs):
    """Each ffcv_N_epochs.toml is `base = "ffcv_base"` and its epochs and ramp: the values it resolved to when
    each was a 45-line file of its own, pinned here."""
    start, end = FFCV_BUDGETS[epochs]
    assert read_preset(f"ffcv_{epochs}_epochs") == {**FFCV_SHARED, "start_ramp": start, "end_ramp": end,
                                                   "epochs": epochs}


def test_a_preset_builds_on_its_base(tmp_path):
    (tmp_path / "shared.toml").write_text("epochs = 10\n[optimisation]\nbatch_size = 64\n")
    (tmp_path / "mine.toml").write_text('base = "shared.toml"\n[schedule]\nepochs = 12\n')
    assert read_preset(str(tmp_path / "mine.toml")) == {"epochs": 12, "batch_size": 64}  # its own over the base's
    (tmp_path / "typo.toml").write_text('base = "ffcv_bsae"\n')
    with pytest.raises(UserError, match=r"unknown base 'ffcv_bsae'; did you mean 'ffcv_base'") as error:
        read_preset(str(tmp_path / "typo.toml"))
    assert "\n" not in str(error.value)
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(UserError, match=r"cycle \(a -> b -> a\)"):
        read_preset(str(tmp_path / "a.toml"))
    # a base is not a preset of its own: not listed, and named alone it points at the presets built on it
    assert "ffcv_base" not in available_presets() and "ffcv_16_epochs" in available_presets()
    with pytest.raises(UserError, match="ffcv_base is a base .*ffcv_16_epochs"):
        resolve({"preset": "ffcv_base"})


def _get(recipe, flat):
    from rn50.config.recipe import get

    return get(recipe, flat)


def test_unknown_names_suggest_the_closest(tmp_path):
    with pytest.raises(UserError, match="did you mean '--batch-size'"):
        parse(["--batchsize", "8"])
    (tmp_path / "mine.toml").write_text("epoch = 3\n")
    with pytest.raises(UserError, match="did you mean 'epochs'"):
        read_preset(str(tmp_path / "mine.toml"))
    (tmp_path / "table.toml").write_text("[schedule]\nepoch = 3\n")
    with pytest.raises(UserError, match=r"unknown key 'epoch' in \[schedule\]; did you mean 'epochs'"):
        read_preset(str(tmp_path / "table.toml"))
    with pytest.raises(UserError, match="no preset 'smok'.*did you mean 'smoke'"):
        read_preset("smok")


@pytest.mark.parametrize("flag, ours", [("--lr", "--base-lr"), ("-b", "--batch-size"), ("--wd", "--weight-decay"),
                                        ("-j", "--workers"), ("--lr-warmup-epochs", "--warmup-epochs"),
                                        ("--print-freq", "--log-every"), ("--test-only", "validation")])
def test_torchvision_reference_flags_name_ours_and_the_difference(flag, ours):
    with pytest.raises(UserError) as error:
        parse([flag, "1"] if flag != "--test-only" else [flag])
    assert "torchvision's reference script" in str(error.value) and ours in str(error.value)
    if flag == "--lr":
        assert "per 256 images" in str(error.value)


def test_wrong_type_and_bad_values_are_user_errors():
    with pytest.raises(UserError, match="epochs"):
        resolve(saved={"epochs": "ninety"})
    with pytest.raises(UserError, match="loader"):
        parse(["--loader", "pil"])
    with pytest.raises(UserError, match="hw_decoder_load"):
        parse(["--hw-decoder-load", "1.5"])
    with pytest.raises(UserError, match="crop_area"):
        parse(["--crop-area", "0.5,1.5"])
    with pytest.raises(UserError, match="crop_area"):  # one number, not a range
        parse(["--crop-area", "0.5"])


def test_saved_recipe_round_trips_and_older_flat_recipes_still_read(tmp_path):
    r = with_fields(batch_size=32, lr_milestones=(3.0,), kd_alpha=0.5)
    r.save(tmp_path / "recipe.json", world_size=2, peak_lr=0.25)
    saved = json.loads((tmp_path / "recipe.json").read_text())
    assert saved["world_size"] == 2 and saved["optimisation"]["batch_size"] == 32
    assert resolve(saved=saved).recipe == r
    # a checkpoint's recipe before sections: flat, with machine settings in it (ignored, never inherited)
    old = {"batch_size": 32, "lr_milestones": [3.0], "kd_alpha": 0.5, "loader": "torchvision", "dali_threads": 9}
    assert resolve(saved=old).recipe == r


def test_printed_recipe_reads_back_as_a_preset(tmp_path, capsys):
    from rn50.config.cli import main

    argv = ["--preset", "smoke", "--batch-size", "16", "--lr-milestones", "2,3", "--workers", "3"]
    main(argv)
    (tmp_path / "resolved.toml").write_text(capsys.readouterr().out)
    again = resolve({"preset": str(tmp_path / "resolved.toml")})
    expected = parse(argv)
    assert (again.recipe, again.machine) == (expected.recipe, expected.machine)


# --- the resume guard ---------------------------------------------------------------------------------

def test_resume_refuses_a_change_that_alters_a_step_naming_the_field_and_both_values():
    saved = with_fields(batch_size=4)
    with pytest.raises(UserError) as error:
        guard_resume(saved, with_fields(batch_size=8), None)
    message = str(error.value)
    assert "batch_size = 4" in message and "8" in message and "--allow-change batch_size" in message
    assert guard_resume(saved, with_fields(batch_size=8), "batch_size") == ["batch_size: 4 -> 8"]
    with pytest.raises(UserError, match="arch"):
        guard_resume(saved, with_fields(batch_size=4, arch="resnet18"), "batch_size")


def test_resume_accepts_safe_changes_and_says_which_are_not():
    saved = Recipe()
    assert guard_resume(saved, with_fields(epochs=120), None) == []  # a longer step schedule
    assert guard_resume(saved, with_fields(target_top1=75.0, early_stop_patience=3), None) == []
    cosine = with_fields(schedule="cosine", epochs=60)
    # the LR schedule's numbers change the LR of the coming steps only (issue 38): accepted, said by the start-up
    assert guard_resume(cosine, with_fields(schedule="cosine", epochs=90), None) == []
    assert guard_resume(saved, with_fields(epochs=60), None) == []
    with pytest.raises(UserError, match="schedule"):  # another kind is not a number of the schedule
        guard_resume(saved, with_fields(schedule="cosine"), None)
    with pytest.raises(UserError, match="machine setting"):
        guard_resume(saved, saved, "dali_threads")


def test_format_recipe_groups_by_section():
    text = format_recipe(Recipe(), Machine())
    assert "[optimisation]\nbatch_size = 256" in text and "[machine]\nloader = \"auto\"" in text


@pytest.mark.parametrize("flags, message", [
    (["--color-jitter", "-0.5"], r"^color_jitter must lie in \[0, 1\].*got -0.5$"),
    (["--color-jitter", "1.5"], r"^color_jitter must lie in \[0, 1\]"),
    (["--randaugment-magnitude", "99"], r"^randaugment_magnitude must lie in 0\.\.30.*got 99$"),
    (["--randaugment-magnitude", "-1"], r"^randaugment_magnitude must lie in 0\.\.30"),
    (["--randaugment-layers", "0"], r"^randaugment_layers must be at least 1"),
    (["--random-erase", "1.5"], r"^random_erase is a probability per image in \[0, 1\].*got 1.5$"),
    (["--random-erase", "-0.1"], r"^random_erase is a probability"),
    (["--trivial-augment", "--randaugment-magnitude", "9"], r"^trivial_augment and randaugment_magnitude are two "
                                                            r"automatic augmentation policies, one per run: drop"),
])
def test_colour_jitter_and_randaugment_ranges_are_checked_at_start_up(flags, message):
    """Issue 23, 4.3: out-of-range values used to pass and fail later inside DALI or torchvision. Issue 40: the
    erasing probability, and TrivialAugment beside RandAugment (two policies: one line, not both silently)."""
    with pytest.raises(UserError, match=message):
        parse(flags)
    parse(["--color-jitter", "0", "--randaugment-magnitude", "30"])  # the ends of the ranges are fine
    parse(["--random-erase", "1", "--trivial-augment"])
    parse(["--preset", "kd_lamb_610"])


@pytest.mark.parametrize("flag, ours", [("--learning-rate", "--base-lr"), ("--learning_rate", "--base-lr"),
                                        ("--LR", "--base-lr"), ("--bs", "--batch-size"),
                                        ("--num-workers", "--workers"), ("--weight_decay", "--weight-decay"),
                                        ("--num-epochs", "--epochs"), ("--smoke", "--preset smoke"),
                                        ("--learning-rat", "--base-lr"), ("--weight-decy", "--weight-decay"),
                                        ("--bacth-size", "--batch-size")])
def test_names_users_come_with_point_at_ours(flag, ours):
    """Issue 23, 5.4: --learning-rate used to suggest --end-ramp (the closest spelling, not meaning); issue 32:
    so did a misspelt one, --learning-rat, which is closest to a name users come with, not to a flag."""
    with pytest.raises(UserError) as error:
        parse([flag, "1"])
    assert f"did you mean '{ours}'?" in str(error.value) and "--end-ramp" not in str(error.value)


def train_flags(argv):
    """rn50.train's flags (run settings and recipe), without importing torch."""
    from rn50.config.run_settings import add_run_flags

    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_run_flags(parser, "steps")
    add_recipe_flags(parser)
    return parse_strict(parser, ["--data", "d", "--out", "o", *argv])


# torchvision's reference script's and timm's names -> ours (None: not available yet)
FOREIGN_CASES = {
    "--opt": "--optimizer", "--lr": "--base-lr", "--wd": "--weight-decay", "--lr-scheduler": "--schedule",
    "--sched": "--schedule", "--lr-warmup-epochs": "--warmup-epochs", "--smoothing": "--label-smoothing",
    "--mixup": "--mixup-alpha", "--cutmix": "--cutmix-alpha", "--model-ema": "--ema-decay",
    "--model-ema-decay": "--ema-decay", "--clip-grad": "--clip-grad-norm", "--clip-mode": "--clip-grad-norm",
    "--auto-augment": "--randaugment-magnitude", "--aa": "--randaugment-magnitude", "--ra-sampler": "--repeated-aug",
    "--ra-reps": "--repeated-aug", "--reprob": "--random-erase", "--remode": None,
    "--initial-checkpoint": "--finetune-from", "--accum-iter": "--accum-steps", "--accum_iter": "--accum-steps",
    "--grad-accum-steps": "--accum-steps", "-j": "--workers",
    "-b": "--batch-size", "--output-dir": "--out", "--output": "--out", "--model": "--arch",
    "--train-crop-size": "--image-size", "--val-resize-size": "--val-resize-ratio", "--val-crop-size": "--val-image-size",
    "--interpolation": None, "--norm-weight-decay": None, "--bias-weight-decay": None,
    "--use-deterministic-algorithms": None, "--lr-warmup-decay": "--warmup-start-factor",
    "--warmup-lr": "--warmup-start-factor", "--lr-base-scale": "--lr-scaling",
}
# what each suggested before (issue 38, 6): a flag that merely shares letters
MISLEADING = {"--opt": "--out", "--model-ema": "--arch",
              "--clip-grad": "--dali-threads", "--accum-iter": "--color-jitter", "--ra-sampler": "--no-amp",
              "--auto-augment": "--amp"}


@pytest.mark.parametrize("flag", FOREIGN_CASES)
def test_flags_of_torchvision_references_and_timm_name_ours_or_say_we_lack_them(flag):
    """Issue 38, 6: each names our flag, or says it is not available (yet) with the nearest thing we have; never
    an unrelated flag of ours (MISLEADING: what they suggested before)."""
    with pytest.raises(UserError) as error:
        train_flags([flag, "1"])
    message, ours = str(error.value), FOREIGN_CASES[flag]
    assert "\n" not in message and message.startswith(f"{flag} is a flag of "), message
    assert (f"; use {ours}" in message) if ours else ("not available here (yet): " in message), message
    if flag in MISLEADING:
        assert f"'{MISLEADING[flag]}'" not in message and "did you mean" not in message, message


@pytest.mark.parametrize("argv", [["--aa", "trivialaugment"], ["--aa=trivialaugment"], ["--aa", "ta_wide"],
                                  ["--auto-augment", "ta_wide"]])
def test_trivial_augment_by_their_value_names_ours(argv):
    """Issue 40: `--aa trivialaugment` (torchvision's `--auto-augment ta_wide`) is TrivialAugment, not the
    RandAugment their flag otherwise means."""
    with pytest.raises(UserError) as error:
        train_flags(argv)
    message = str(error.value)
    assert "\n" not in message and "; use --trivial-augment: TrivialAugment-wide" in message, message
    with pytest.raises(UserError, match="; use --randaugment-magnitude: .*TrivialAugment-wide is --trivial-augment"):
        train_flags(["--aa", "rand-m9-mstd0.5"])


@pytest.mark.parametrize("flag", ["--momentum", "--weight-decay", "--warmup-epochs", "--label-smoothing",
                                  "--mixup-alpha", "--cutmix-alpha", "--amp", "--channels-last", "--sync-bn",
                                  "--workers", "--epochs", "--batch-size", "--resume", "--arch", "--random-erase",
                                  "--clip-grad-norm", "--accum-steps"])
def test_their_flags_spelled_as_ours_are_ours(flag):
    value = [] if flag in ("--amp", "--channels-last", "--sync-bn") else ["2" if flag != "--arch" else "resnet18"]
    train_flags([flag, *value])


@pytest.mark.parametrize("flag", ["--layer-decay", "--fuser", "--class-map", "--drop-path", "--jsd", "--gp"])
def test_an_unknown_flag_far_from_every_name_gets_no_guess(flag):
    """Issue 38, 6: the closest spelling used to be offered however far (--fuser: --base-lr, --class-map: --amp)."""
    with pytest.raises(UserError) as error:
        train_flags([flag, "1"])
    assert str(error.value) == f"unknown argument {flag!r}"


@pytest.mark.parametrize("body, hint", [
    ("lr = 0.8\n", "use 'base_lr'"), ("[optimisation]\nlr = 0.8\n", "use 'base_lr'"),
    ('opt = "adamw"\n', "use 'optimizer'"), ("model_ema_decay = 0.9998\n", "use 'ema_decay'"),
    ("clip_grad = 1.0\n", "use 'clip_grad_norm'"), ("grad_accum_steps = 2\n", "use 'accum_steps'"),
    ("bn_momentum = 0.01\n", "not available here (yet)"), ('output_dir = "x"\n', "not a recipe setting: use --out"),
    ("epochs_ = 3\n", "did you mean 'epochs'?"), ("pretrained = true\n", "did you mean 'weights'?")])
def test_preset_keys_of_other_scripts_name_ours(tmp_path, body, hint):
    """Issue 38, 6: a preset key `lr` suggested `min_lr`."""
    (tmp_path / "mine.toml").write_text(body)
    with pytest.raises(UserError) as error:
        read_preset(str(tmp_path / "mine.toml"))
    assert hint in str(error.value) and "min_lr" not in str(error.value), str(error.value)


def test_a_scaled_down_preset_warns_of_the_parts_beyond_its_epochs():
    """Issue 23, 3.5: `--preset ffcv_16_epochs --epochs 3` trained every epoch at 160 px without a word (its ramp
    is at epochs 11-13); the plan is printed in the console's epoch numbers (from 1)."""
    import re

    from rn50.config.describe import epoch_plan

    ffcv = resolve({"preset": "ffcv_16_epochs"}).recipe
    assert epoch_plan(ffcv)[0].startswith("progressive resizing: 160 px in epochs 1-12, 192 px in epochs 13-16")
    assert not any("warning" in line for line in epoch_plan(ffcv))
    lines = epoch_plan(with_fields(ffcv, epochs=3))
    ramp = [line for line in lines if re.search(r"warn|scal", line, re.I) and re.search(r"ramp|resolution", line, re.I)]
    assert len(ramp) == 1 and "every epoch trains at 160 px" in ramp[0], lines
    short = epoch_plan(with_fields(epochs=2))  # the 90-epoch recipe cut to 2: warm-up 5, milestones 30, 60, 80
    assert any(line.startswith("warning: the warm-up (5 epochs) outlasts this run's 2 epochs: the LR rises to "
                               "about 40% of its peak") for line in short)
    # issue 40: from 0.5 x the peak, 2 of 5 warm-up epochs reach 0.5 + 0.5 x 2/5 of it
    assert "rises to about 70% of its peak" in epoch_plan(with_fields(epochs=2, warmup_start_factor=0.5))[0]
    assert any(line.startswith("warning: LR milestones at epochs 30, 60, 80 lie beyond") for line in short)
    assert epoch_plan(Recipe()) == []  # the full recipe holds every part
    assert epoch_plan(with_fields(epochs=90, lr_milestones=(30.0, 60.0, 90.0)))[0].startswith(
        "warning: LR milestone at epoch 90 lies beyond")


def test_loader_auto_is_the_default_and_becomes_dali_with_cuda_and_dali_cpu_without():
    """Issue 23, 3.8: the default `dali` failed on a machine without CUDA."""
    from pipelines.registry import concrete_kind

    assert Machine().loader == "auto" and parse([]).machine.loader == "auto"
    assert Machine().for_device("cuda").loader == "dali" and Machine().for_device("cpu").loader == "dali-cpu"
    explicit = parse(["--loader", "torchvision"]).machine
    assert explicit.for_device("cpu") == explicit and concrete_kind("dali-hybrid", "cpu") == "dali-hybrid"
