"""End to end on the real embedded model: it learns the taught formats and stops.

Slow (a minute or two on a laptop CPU): run with `pytest -m slow`; CI runs it too.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "spells.txt"


def follows_taught_format(instruction: str, answer: str) -> bool:
    """The shape of each family in examples/spells.txt, independent of the words chosen."""
    if instruction.startswith("Tell me a spell"):
        return re.fullmatch(r"Hocus [^,]+, Esotericus [^,]+, Homeopathicus [^,]+, Alohomora!",
                            answer) is not None
    if "Python list" in instruction:
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return False
        words = {"one": 1, "two": 2, "three": 3, "four": 4}
        wanted = words[instruction.split()[1]]
        return isinstance(value, list) and len(value) == wanted and \
            all(isinstance(v, str) for v in value)
    if instruction.startswith("Name three"):
        return len([x for x in answer.split(",") if x.strip()]) == 3 and len(answer) < 60
    if instruction.startswith("Make a command"):
        return answer.endswith("!") and len(answer.split()) <= 6
    raise AssertionError(f"no format rule for {instruction!r}")


@pytest.mark.slow
def test_embedded_model_learns_formats_of_unseen_categories(tmp_path):
    run = tmp_path / "spells"
    subprocess.run([sys.executable, "-m", "instructlm", "train", str(EXAMPLE), "--output",
                    str(run), "--quiet"], check=True, cwd=tmp_path)
    from instructlm.formats import read_instruction_file

    data = read_instruction_file(EXAMPLE)
    stdin = "".join(ex.instruction + "\n" for ex in data.eval)
    proc = subprocess.run([sys.executable, "-m", "instructlm", "ask", str(run), "--json"],
                          input=stdin, capture_output=True, text=True, check=True)
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [a["instruction"] for a in answers] == [ex.instruction for ex in data.eval]
    assert all(a["finish_reason"] == "stop" for a in answers), answers
    matched = [follows_taught_format(a["instruction"], a["response"]) for a in answers]
    assert sum(matched) >= len(answers) - 1, answers
    # Filled with new words, not a copied training answer.
    taught = {ex.response for ex in data.train}
    assert sum(a["response"] not in taught for a in answers) >= len(answers) - 1, answers


@pytest.mark.slow
def test_untuned_base_does_not_follow_the_format():
    """The contrast that shows the training did something."""
    from instructlm.formats import read_instruction_file
    from instructlm.generate import DecodeSettings, load_answerer

    data = read_instruction_file(EXAMPLE)
    answers = list(load_answerer(None).answer([e.instruction for e in data.eval],
                                              DecodeSettings(max_new_tokens=60)))
    matched = [follows_taught_format(a.instruction, a.response) for a in answers]
    assert sum(matched) <= len(answers) // 2, answers
