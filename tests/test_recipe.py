"""One recipe dataclass: 90-epoch defaults, presets, CLI overrides, strict names, saved resolution."""

from __future__ import annotations

import argparse
import json

import pytest

from rn50.errors import UserError
from rn50.recipe import Recipe, add_recipe_flags, available_presets, from_mapping, load_preset, parse_strict, recipe_from_args


def parse(argv):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_recipe_flags(parser)
    return recipe_from_args(parse_strict(parser, argv))


def test_defaults_are_the_90_epoch_recipe():
    r = Recipe()
    assert (r.epochs, r.batch_size, r.base_lr, r.base_batch) == (90, 256, 0.1, 256)
    assert (r.momentum, r.nesterov, r.weight_decay, r.label_smoothing) == (0.9, True, 1e-4, 0.1)
    assert (r.warmup_epochs, r.lr_milestones, r.lr_decay) == (5.0, (30.0, 60.0, 80.0), 0.1)
    assert r.amp and r.amp_dtype == "float16" and r.channels_last and r.zero_init_residual
    assert (r.image_size, r.color_jitter, r.loader) == (224, 0.4, "dali")


def test_every_field_is_a_flag_and_overrides_one_field():
    r = parse(["--batch-size", "64", "--lr-milestones", "10,20", "--no-amp", "--color-jitter", "0",
               "--arch", "resnet18"])
    assert (r.batch_size, r.lr_milestones, r.amp, r.color_jitter, r.arch) == (64, (10.0, 20.0), False, 0.0, "resnet18")
    assert r.epochs == 90  # untouched fields keep the recipe


def test_preset_layers_under_flags():
    assert "smoke" in available_presets()
    r = parse(["--preset", "smoke", "--epochs", "7"])
    assert r.epochs == 7 and r.warmup_epochs == 1.0 and r.lr_milestones == (3.0,)


def test_unknown_flag_names_the_closest():
    with pytest.raises(UserError, match="did you mean '--batch-size'"):
        parse(["--batchsize", "8"])


def test_unknown_preset_key_names_the_closest(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text("epoch = 3\n")
    with pytest.raises(UserError, match="did you mean 'epochs'"):
        load_preset(str(preset))
    with pytest.raises(UserError, match="no preset 'smok'.*did you mean 'smoke'"):
        load_preset("smok")


def test_wrong_type_and_bad_values_are_user_errors():
    with pytest.raises(UserError, match="epochs"):
        from_mapping({"epochs": "ninety"})
    with pytest.raises(UserError, match="loader"):
        parse(["--loader", "pil"])
    with pytest.raises(UserError, match="hw_decoder_load"):
        parse(["--hw-decoder-load", "1.5"])


def test_saved_recipe_round_trips(tmp_path):
    r = Recipe(batch_size=32, lr_milestones=(3.0,))
    r.save(tmp_path / "recipe.json", world_size=2)
    saved = json.loads((tmp_path / "recipe.json").read_text())
    assert saved["world_size"] == 2
    saved.pop("world_size")
    assert from_mapping(saved) == r


def test_printed_recipe_reads_back_as_a_preset(tmp_path, capsys):
    from rn50.recipe import main

    main(["--preset", "smoke", "--batch-size", "16", "--lr-milestones", "2,3"])
    (tmp_path / "resolved.toml").write_text(capsys.readouterr().out)
    assert load_preset(str(tmp_path / "resolved.toml")) == parse(["--preset", "smoke", "--batch-size", "16",
                                                                  "--lr-milestones", "2,3"])
