"""One exit-code table (rn50/reliability/exits.py): main, the restart's exit records and docs/reliability.md
read the same codes (issue 38.1)."""

from __future__ import annotations

import re
from pathlib import Path

import rn50.train
from rn50.config.errors import UserError
from rn50.reliability.exits import (EXIT_CODES, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_STORAGE,
                                    exit_code_of)
from rn50.reliability.integrity import NotWritten
from rn50.reliability.preemption import DataLost, Diverged, Preempted

ROOT = Path(__file__).resolve().parents[2]


def test_docs_exit_code_table_is_the_codes_table():
    text = (ROOT / "docs" / "reliability.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = [int(code) for code in re.findall(r"^\| (\d+) \|", section, re.M)]
    assert documented == list(EXIT_CODES), (documented, list(EXIT_CODES))


def test_train_docstring_names_every_code():
    line = " ".join(rn50.train.__doc__.split("Exit codes", 1)[1].split())
    named = [int(code) for code in re.findall(r"\b(\d+) [a-zA-Z]", line)]
    assert named == list(EXIT_CODES), named


def test_each_end_maps_to_its_code():
    assert exit_code_of(None) == 0
    assert exit_code_of(UserError("x")) == 2
    assert exit_code_of(Diverged("nan")) == EXIT_DIVERGED == 3
    assert exit_code_of(NotWritten("full")) == EXIT_STORAGE == 74
    assert exit_code_of(Preempted("SIGTERM", None)) == EXIT_PREEMPTED == 75
    assert exit_code_of(Preempted("SIGINT", None)) == EXIT_INTERRUPTED == 130
    assert exit_code_of(DataLost("storage lost", None)) == EXIT_PREEMPTED
    assert exit_code_of(SystemExit(4)) == 4
    assert exit_code_of(RuntimeError("bug")) == 1
