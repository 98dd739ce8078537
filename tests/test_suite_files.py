"""The generalization suite (benchmarks/suite/): what `make generalize` trains on is what its
builder writes, split up front, and every held-out line is about something new."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

from instructlm.data.formats import read_instruction_file

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "suite"


def load_builder():
    spec = importlib.util.spec_from_file_location("suite_build", SUITE / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_the_files_are_what_the_builder_writes_and_the_halves_split_them():
    build = load_builder()
    halves = json.loads((SUITE / "halves.json").read_text(encoding="utf-8"))
    names = [s.name for s in build.SUITE]
    assert sorted(halves["tuning"] + halves["check"]) == sorted(names)
    assert not set(halves["tuning"]) & set(halves["check"])
    assert halves["fresh"] == [s.name for s in build.FRESH]
    for number, spec in enumerate(build.SUITE):
        written = (SUITE / f"{spec.name}.txt").read_text(encoding="utf-8")
        assert written == build.build(spec, 1000 + number), spec.name
    for number, spec in enumerate(build.FRESH):
        written = (SUITE / f"{spec.name}.txt").read_text(encoding="utf-8")
        assert written == build.build(spec, build.FRESH_SEED + number), spec.name
    assert len(names) >= 16 and {s.lang for s in build.SUITE} == {"en", "de"}


def test_the_fresh_files_teach_families_the_suite_does_not():
    build = load_builder()
    suite = {f for spec in build.SUITE for f in spec.families}
    fresh = {f for spec in build.FRESH for f in spec.families}
    assert fresh and not fresh & suite
    assert {s.lang for s in build.FRESH} == {"en", "de"}


def test_every_file_holds_out_new_categories_for_each_family():
    build = load_builder()
    for spec in build.SUITE + build.FRESH:
        data = read_instruction_file(SUITE / f"{spec.name}.txt")
        assert 10 <= len(data.train) <= 200 and 2 <= len(spec.families) <= 6
        assert len(data.eval) >= 2 * len(spec.families)
        assert not data.warnings, data.warnings  # no duplicates, no contradictions
        table = build.EN if spec.lang == "en" else build.DE
        held = re.search(r"never uses \((.*)\)", (SUITE / f"{spec.name}.txt").read_text(
            encoding="utf-8")).group(1).split(", ")
        members = {w for c in held for w in table[c].split()}
        lines = [set(re.findall(r"\w+", f"{ex.instruction} {ex.response}")) for ex in data.train]
        # Words of a family's own wording ("square brackets") are in many lines.
        frame = {w for w in members if sum(w in words for words in lines) >= 3}
        for ex, words in zip(data.train, lines):  # no held-out category or member is taught
            assert not words & (members - frame | set(held)), (spec.name, ex.source)
        for ex in data.eval:  # every held-out line asks about a held-out category
            words = set(re.findall(r"\w+", f"{ex.instruction} {ex.response}"))
            assert words & (members | set(held)), (spec.name, ex.source)
