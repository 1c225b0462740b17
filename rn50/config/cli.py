"""The command line of the configuration: one flag per recipe and machine field (add_recipe_flags), and
parse_strict, which makes every mistake on the command line one line that names the fix: an unknown flag
suggests the closest one, a name users come with (lr, wd, bs, ...) points at ours, a flag of torchvision's
reference script says how ours differs.

`python -m rn50.recipe [--preset NAME[,NAME]] [--field value ...]` prints the resolved recipe as TOML.
"""

from __future__ import annotations

import argparse
import re
import sys
import typing

from rn50.config.describe import format_recipe
from rn50.config.errors import UserError
from rn50.config.names import USER_NAMES, closest, foreign_flag, plain as _plain
from rn50.config.recipe import MACHINE_FIELDS, RECIPE_FIELDS, SHORTHANDS, available_presets, resolve

def _flag_type(kind):
    if typing.get_origin(kind) is tuple:
        return numbers
    return kind


def numbers(text: str) -> tuple[float, ...]:
    """A flag's comma-separated numbers (`--crop-area 0.08,1`)."""
    return tuple(float(v) for v in text.split(",") if v.strip())


def add_recipe_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One flag per field, defaulting to None so that only flags the user gave override a preset.
    `only`: just these fields' flags (flat names; "preset" for --preset), for commands that need a few."""
    for title, table in (("recipe (defaults: the 90-epoch recipe)", RECIPE_FIELDS),
                         ("machine settings (not part of the recipe; free to change on resume)", MACHINE_FIELDS)):
        group = parser.add_argument_group(title)
        if table is RECIPE_FIELDS and (only is None or "preset" in only):
            group.add_argument("--preset", default=None, metavar="NAME[,NAME...]",
                               help=f"recipe presets, applied left to right: {', '.join(available_presets())} "
                                    "or paths to .toml files")
        for f in table.values():
            if only is not None and f.flat not in only:
                continue
            flag = "--" + f.flat.replace("_", "-")
            text = f"{f.help} (default {f.default})".strip().replace("%", "%%")
            shorthands = [(name, value) for name, (flat, value) in SHORTHANDS.items() if flat == f.flat]
            # a field's flag and its shorthands exclude each other: `--weights X --pretrained` is one line
            target = group.add_mutually_exclusive_group() if shorthands else group
            if f.kind is bool:
                target.add_argument(flag, dest=f.flat, action=argparse.BooleanOptionalAction, default=None, help=text)
            else:
                metavar = "A,B,..." if typing.get_origin(f.kind) is tuple else f.kind.__name__.upper()
                target.add_argument(flag, dest=f.flat, type=_flag_type(f.kind), default=None, metavar=metavar,
                                    help=text)
            for name, value in shorthands:  # a bare flag: `--pretrained` is `--weights DEFAULT`
                target.add_argument("--" + name.replace("_", "-"), dest=f.flat, action="store_const", const=value,
                                    default=None, help=f"the same as {flag} {value}")


def parse_strict(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_args, but an unknown flag is a UserError naming the closest known flag, or, for a flag of
    torchvision's reference script or timm's train.py (rn50.config.names.FOREIGN), ours and how it differs, or
    that we do not have it (yet). Every other mistake argparse finds (a value of the wrong type, a missing
    required flag) is a UserError too: one line, exit 2, no usage dump."""
    parser.error = _raise_usage_error
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [o for a in parser._actions for o in a.option_strings]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        name, _, value = bad.partition("=")
        after = unknown[unknown.index(bad) + 1:]
        value = value or (after[0] if after and not after[0].startswith("-") else None)  # `--aa trivialaugment`
        known = foreign_flag(name, flags, value)
        if known:
            raise UserError(known)
        raise UserError(f"unknown argument {bad!r}{_suggest(name, flags)}")
    return args


def _suggest(name: str, flags) -> str:
    """The hint after an unknown flag: ours for a name users come with (USER_NAMES), else the closest
    spelling among the parser's flags and those names, compared without dashes and underscores."""
    ours, note = USER_NAMES.get(_plain(name), (None, ""))
    if ours in flags:
        return f"; did you mean {ours!r}?" + (f" ({note})" if note else "")
    if "--preset" in flags and name.lstrip("-") in available_presets():
        return f"; did you mean '--preset {name.lstrip('-')}'?"
    # a misspelt name users come with (--learning-rat) is as close as a misspelt flag: both are candidates; only
    # a typo's distance counts (rn50.config.names.closest), never a flag that merely shares letters
    candidates = {plain: (ours, note) for plain, (ours, note) in USER_NAMES.items() if ours in flags}
    candidates.update({_plain(f): (f, "") for f in flags if f.startswith("--")})
    match = closest(name, list(candidates))
    if match is None:
        return ""
    ours, note = candidates[match]
    return f"; did you mean {ours!r}?" + (f" ({note})" if note else "")


def _raise_usage_error(message: str):
    wrong_type = re.fullmatch(r"argument (\S+?)(?:/\S+)?: invalid (\w+) value: (.*)", message)
    if wrong_type:
        flag, kind, value = wrong_type.groups()
        kind = {"int": "a whole number", "float": "a number",
                "numbers": "comma-separated numbers (e.g. 0.08,1)"}.get(kind, f"a value of type {kind}")
        raise UserError(f"{flag} takes {kind}, got {value}")
    raise UserError(message.removeprefix("argument "))


def main(argv=None) -> None:
    """`python -m rn50.recipe [--preset NAME[,NAME]] [--field value ...]`: print the resolved recipe."""
    parser = argparse.ArgumentParser(prog="rn50.recipe", description=main.__doc__, allow_abbrev=False)
    add_recipe_flags(parser)
    try:
        resolved = resolve(parse_strict(parser, argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for note in resolved.overridden:
        print(f"# {note}")
    print(format_recipe(resolved.recipe, resolved.machine))

