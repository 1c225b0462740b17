"""docs/reference.md is generated from the recipe's field list (rn50/config/reference.py) and kept current: a field,
default, help text or preset changed in the code without regenerating the page fails here."""

from __future__ import annotations

from pathlib import Path

from rn50.config.recipe import MACHINE_FIELDS, RECIPE_FIELDS, available_presets
from rn50.config.reference import COMMAND, reference

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def test_the_committed_reference_is_current():
    assert PAGE.read_text() == reference() + "\n", f"docs/reference.md is stale; regenerate it: {COMMAND}"


def test_the_reference_names_every_field_flag_and_preset():
    text = reference()
    for f in {**RECIPE_FIELDS, **MACHINE_FIELDS}.values():
        assert f"`--{f.flat.replace('_', '-')}`" in text, f.flat
        assert f.help.split("|")[0].strip() in text.replace("\\|", "|"), f.flat
    for name in available_presets():
        assert f"### `{name}`" in text
    assert "### `ffcv_base`" not in text  # a base, not a preset
