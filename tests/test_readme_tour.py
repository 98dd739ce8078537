"""The README's tour, command by command, on the tiny model: the guide cannot drift from the
tool. Each `instructlm` line of the tour runs as written, with the tiny model in place of
the embedded one (`--base` added where a base model is loaded)."""

from __future__ import annotations

import io
import json
import shlex
import shutil
from pathlib import Path

import pytest

from instructlm.cli import main
from instructlm.training.train import default_output

ROOT = Path(__file__).resolve().parent.parent
LOADS_A_BASE = {"train", "curve", "inspect"}
ELSEWHERE = {"serve": "test_serve.py runs the server", "torchrun": "test_distributed.py",
             "accelerate": "test_distributed.py"}


def tour_commands() -> list[str]:
    """The indented command lines of the README's "A short tour"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    tour = text.split("## A short tour", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in tour.splitlines()
            if line.startswith("    ") and ("instructlm " in line or "-m instructlm" in line)]


def test_the_tour_lists_the_commands_a_user_needs():
    verbs = {shlex.split(c, comments=True)[1] for c in tour_commands()
             if c.startswith("instructlm ")}
    assert verbs >= {"inspect", "train", "ask", "eval", "compare", "curve", "serve", "export"}


@pytest.mark.parametrize("line", tour_commands())
def test_tour_command_runs_as_written(line, tour_folder, tiny_base, tmp_path, capsys,
                                      monkeypatch):
    words = shlex.split(line, comments=True)
    if words[0] in ELSEWHERE or "serve" in words[:2]:
        pytest.skip(ELSEWHERE.get(words[0], ELSEWHERE["serve"]))
    if words[0] == "cat":  # `cat FILE | instructlm ...`: the file on standard input
        source, words = words[1], words[words.index("|") + 2:]
        monkeypatch.setattr("sys.stdin", io.StringIO((tour_folder / source).read_text()))
    else:
        words = words[1:]
    words = [str(tiny_base) if w == "embedded" else w for w in words]
    if words[0] in LOADS_A_BASE:
        words += ["--base", str(tiny_base)]
    if words[0] in ("train", "curve"):
        words += ["--quiet"]
    if words[0] == "train":  # in a folder of its own: the others' run is there already
        shutil.copytree(tour_folder / "examples", tmp_path / "examples")
        monkeypatch.chdir(tmp_path)
    else:
        monkeypatch.chdir(tour_folder)
    assert main(words) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if words[0] == "train":
        output = words[words.index("-o") + 1] if "-o" in words else default_output(words[1])
        assert (Path(output) / "instructlm.json").is_file()
    if "--json" in words:
        assert [json.loads(row) for row in out.splitlines()]
    if "--report" in words:
        assert Path(words[words.index("--report") + 1]).stat().st_size > 0


@pytest.fixture(scope="module")
def tour_folder(tmp_path_factory, tiny_base) -> Path:
    """A folder with the repository's examples and `runs/spells`, as after the tour's
    `train` line."""
    folder = tmp_path_factory.mktemp("tour")
    shutil.copytree(ROOT / "examples", folder / "examples")
    assert main(["train", str(folder / "examples" / "spells.txt"), "-o",
                 str(folder / "runs" / "spells"), "--base", str(tiny_base), "--quiet"]) == 0
    (folder / "questions.txt").write_text("Tell me a spell about three cheeses.\n"
                                          "Name three birds and give them as a Python list.\n",
                                          encoding="utf-8")
    return folder
