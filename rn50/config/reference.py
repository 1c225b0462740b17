"""The field reference, docs/reference.md, generated from the recipe's own field list: every field's flag,
preset key, section, type, default and help text (rn50.config.recipe's RECIPE_FIELDS and MACHINE_FIELDS), then the
values each preset in rn50/presets/ sets. Written by

    python -m rn50.config.reference > docs/reference.md

and kept current by tests/unit/test_reference.py, which regenerates it and compares."""

from __future__ import annotations

import json
import typing

from rn50.config.names import FOREIGN, FOREIGN_VALUES
from rn50.config.recipe import MACHINE_FIELDS, RECIPE_FIELDS, SHORTHANDS, available_presets, read_preset

COMMAND = "python -m rn50.config.reference > docs/reference.md"

_SECTION_NOTES = {
    None: "top level of the recipe (a preset sets it outside any table)",
    "machine": "machine settings: how this machine runs the recipe, not part of it (saved as machine.json, free "
               "to change on resume, never taken from a checkpoint)",
}


def _json(value) -> str:
    """A value as JSON (tuples as lists), the form the tables and recipe.json show."""
    return json.dumps(value)


def _type(kind) -> str:
    if typing.get_origin(kind) is tuple:
        return "numbers (`A,B,...`)"
    return getattr(kind, "__name__", str(kind))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _flag(f) -> str:
    flag = "--" + f.flat.replace("_", "-")
    if f.kind is bool:
        return f"`{flag}` / `--no-{flag[2:]}`"
    shorthands = [f"`--{name.replace('_', '-')}` (`{flag} {value}`)" for name, (flat, value) in SHORTHANDS.items()
                  if flat == f.flat]
    return " / ".join([f"`{flag}`", *shorthands])


def _name(f) -> str:
    """The field's flat name, and its name inside its section's table where that differs."""
    if f.section in (None, "machine") or f.name == f.flat:
        return f"`{f.flat}`"
    return f"`{f.flat}` (`[{f.section}] {f.name}`)"


def sections() -> dict[str | None, list]:
    """Fields by section, in the recipe's order, machine settings last."""
    grouped: dict[str | None, list] = {}
    for f in list(RECIPE_FIELDS.values()) + list(MACHINE_FIELDS.values()):
        grouped.setdefault(f.section, []).append(f)
    return grouped


def reference() -> str:
    fields = {**RECIPE_FIELDS, **MACHINE_FIELDS}
    lines = [
        "# Field reference",
        "",
        f"<!-- generated from rn50/config/recipe.py's field list by `{COMMAND}`; do not edit by hand "
        "(tests/unit/test_reference.py fails when it is stale) -->",
        "",
        "Every setting of `rn50.train` (and of `benchmarks.run`, `rn50.recipe` and `tools.sweep` after `--`): its "
        "flag, its type, its default and what it does. The field's name is its key in a preset and in "
        "`recipe.json` / `machine.json`; a preset may also set it inside the table of its section "
        "(`[schedule]` then `epochs = 16`), under the name in brackets where that differs. Layers, lowest first: these defaults, the "
        "presets given with `--preset a,b` (left to right), then single flags. "
        "[recipe.md](recipe.md) explains the 90-epoch recipe's choices, "
        "[recipes-advanced.md](recipes-advanced.md) the fields beyond it, [presets.md](presets.md) the presets. "
        "`python -m rn50.recipe --preset NAME` prints a preset resolved.",
        "",
        f"{len(RECIPE_FIELDS)} recipe fields and {len(MACHINE_FIELDS)} machine settings.",
        "",
    ]
    for section, members in sections().items():
        title = "`seed` and other top-level fields" if section is None else f"`{section}`"
        lines += [f"## {title}", ""]
        if section in _SECTION_NOTES:
            lines += [_SECTION_NOTES[section][0].upper() + _SECTION_NOTES[section][1:] + ".", ""]
        lines += ["| field | flag | type | default | meaning |", "|---|---|---|---|---|"]
        for f in members:
            lines.append(f"| {_name(f)} | {_flag(f)} | {_type(f.kind)} | `{_json(f.default)}` | "
                         f"{_cell(f.help)} |")
        lines.append("")
    lines += [
        "## What each preset sets",
        "",
        "The values each preset in `rn50/presets/` sets (its base's included); every other field keeps the default "
        "above. A preset file's comments give the reasons. Files named `*_base.toml` are bases that presets build on "
        "(`base = \"NAME\"` in a preset: the base's values first, the preset's own over them), not presets of "
        "their own.",
        "",
    ]
    for name in available_presets():
        values = read_preset(name)
        lines += [f"### `{name}`", "", f"[rn50/presets/{name}.toml](../rn50/presets/{name}.toml)", "",
                  "| field | value | default |", "|---|---|---|"]
        for flat, value in values.items():
            same = " (the default)" if value == fields[flat].default else ""
            lines.append(f"| `{flat}` | `{_json(value)}` | `{_json(fields[flat].default)}`{same} |")
        lines.append("")
    lines += [
        "## Flags of other scripts",
        "",
        "Flags of torchvision's reference script and timm's `train.py` that people bring along (rn50/config/names.py): "
        "given to `rn50.train` (or as a preset key), each is an error that names ours and what differs, or says that "
        "we do not have it (yet) and what comes nearest. Flags spelled as ours (`--epochs`, `--amp`, ...) are ours.",
        "",
        "| their flag | from | ours | what to know |", "|---|---|---|---|",
    ]
    rows = {**FOREIGN, **{f"{flag} {value}": found for (flag, value), found in FOREIGN_VALUES.items()}}
    for flag, (source, ours, note) in sorted(rows.items(), key=lambda item: item[0].lstrip("-").lower()):
        ours_cell = ours if ours and ours.startswith("`") else f"`{ours}`" if ours else "not available (yet)"
        lines.append(f"| `{flag}` | {_cell(source)} | {_cell(ours_cell)} | {_cell(note)} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    print(reference(), end="\n")


if __name__ == "__main__":
    main()
