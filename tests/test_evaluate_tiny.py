"""eval, compare and curve on a tiny random model: scores, tables, the HTML report, the plot."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from instructlm.cli import main
from instructlm.curve import family, parse_sizes, spread_order
from instructlm.data.formats import Example
from instructlm.errors import InstructlmError
from instructlm.measuring.evaluate import eval_set_for, parse_decodes
from instructlm.training.settings import TrainSettings
from instructlm.training.train import train

FACTS = """\
Say hello.#Hello!
Name three fruits.#Apple, banana, cherry
Tell me a spell.#Hocus Pocus!
Tell me a spell now.#Hocus Pocus!
# _EVAL_
Name three fruits.#Apple, banana, cherry
Tell me a spell.#Hocus Pocus!
"""
TINY = dict(template="seed-en", epochs=60, lr=3e-3, batch_size=3, warmup_ratio=0.05, seed=0)


@pytest.fixture(scope="module")
def facts_run(tmp_path_factory, tiny_base) -> Path:
    folder = tmp_path_factory.mktemp("eval")
    (folder / "facts.txt").write_text(FACTS, encoding="utf-8")
    return train(folder / "facts.txt", folder / "facts",
                 TrainSettings(base=str(tiny_base), **TINY), report=lambda m: None,
                 progress=False)


class Cells(HTMLParser):
    """Collects the text of every table cell and notes any external reference."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self.external: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self._in_cell = tag in ("td", "th")
        if self._in_cell:
            self.cells.append("")
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("data:"):
                self.external.append(value)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data


def parse_html(path: Path) -> Cells:
    parser = Cells()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def test_eval_scores_the_runs_own_eval_part(facts_run, capsys):
    assert main(["eval", str(facts_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["instruction"] for r in result["examples"]] == ["Name three fruits.",
                                                              "Tell me a spell."]
    assert result["summary"]["exact"] == 1.0 and result["summary"]["stopped"] == 1.0
    assert result["eval_loss"] < 1.0
    assert all(r["chrf"] == 100.0 for r in result["examples"])


def test_eval_table_and_html_report_hold_every_example(facts_run, tmp_path, capsys):
    report = tmp_path / "report.html"
    assert main(["eval", str(facts_run), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "Name three fruits." in out and "format 2/2" in out and "eval loss" in out
    page = parse_html(report)
    assert not page.external  # self-contained
    for text in ("Name three fruits.", "Tell me a spell.", "Apple, banana, cherry",
                 "Hocus Pocus!", "format", "chrF"):
        assert text in page.cells, text


def test_eval_tells_a_taught_answer_given_again(facts_run, tiny_base, write, capsys):
    # The run learned its facts by heart: asked for three fruits, it names the taught ones.
    path = write("other.txt", "Name three fruits.#Pear, plum, fig\nTell me a spell.#Hocus Pocus!\n")
    assert main(["eval", str(facts_run), str(path), "--json", "--no-loss"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["answer"] for r in result["examples"]] == ["Apple, banana, cherry", "Hocus Pocus!"]
    assert [r["copied"] for r in result["examples"]] == [True, False]  # the second is right
    assert result["summary"]["copied"] == 0.5
    assert main(["eval", str(facts_run), str(path), "--no-loss"]) == 0
    out = capsys.readouterr().out
    assert "copied" in out.splitlines()[0] and "copied 1/2" in out
    # A base model was taught nothing, so nothing it says is copied.
    assert main(["eval", str(tiny_base), str(path), "--json", "--no-loss"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["summary"]["copied"] is None
    assert {r["copied"] for r in result["examples"]} == {None}


def test_eval_on_a_file_of_eval_examples_with_checks(facts_run, write, capsys):
    path = write("checks.jsonl", "\n".join([
        '{"prompt": "Tell me a spell.", "completion": "Hocus Pocus!", "split": "eval", '
        '"check": "Hocus \\\\w+!"}',
        '{"prompt": "Name three fruits.", "completion": "Apple, banana, cherry", '
        '"split": "eval", "check": {"list": 3}}',
    ]))
    assert main(["eval", str(facts_run), str(path), "--json", "--no-loss"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["check"] for r in result["examples"]] == [True, False]  # not a Python list
    assert result["summary"]["n_checked"] == 2 and result["summary"]["check"] == 0.5
    assert result["eval_loss"] is None


def test_eval_without_held_out_examples_says_what_it_scores(tmp_path, tiny_base, capsys):
    data = tmp_path / "plain.txt"
    data.write_text("Say hello.#Hello!\n", encoding="utf-8")
    run = train(data, tmp_path / "plain", TrainSettings(base=str(tiny_base), **TINY),
                report=lambda m: None, progress=False)
    assert main(["eval", str(run), "--json", "--no-loss"]) == 0
    captured = capsys.readouterr()
    assert "memorisation" in captured.err
    assert json.loads(captured.out)["summary"]["n"] == 1


def test_eval_of_a_base_model_needs_a_file(tiny_base):
    with pytest.raises(InstructlmError, match="is not a trained run"):
        eval_set_for(str(tiny_base), None)


def test_compare_tuned_against_untuned_base_and_decodings(facts_run, tiny_base, tmp_path,
                                                          capsys):
    report = tmp_path / "compare.html"
    assert main(["compare", str(facts_run), "--base", "--decode", "greedy,beams2,sample0.5",
                 "--max-new-tokens", "16", "--json", "--report", str(report)]) == 0
    results = json.loads(capsys.readouterr().out)
    base = f"{tiny_base} (untuned, seed-en template)"
    assert [(r["model"], r["decode"]) for r in results] == [
        ("facts", "greedy"), ("facts", "beams2"), ("facts", "sample0.5"),
        (base, "greedy"), (base, "beams2"), (base, "sample0.5")]
    tuned, untuned = results[0], results[3]
    assert tuned["summary"]["format"] == 1.0 and untuned["summary"]["format"] == 0.0
    assert tuned["eval_loss"] < untuned["eval_loss"]
    assert base in parse_html(report).cells


def test_compare_base_flag_needs_a_run(tiny_base, write, capsys):
    path = write("e.txt", "a#b\n")
    assert main(["compare", str(tiny_base), "--base", "--file", str(path)]) == 2
    assert "none of the models is a run" in capsys.readouterr().err


@pytest.mark.parametrize("spec, message", [("beams", "unknown decoding"),
                                           ("greedy,topk5", "unknown decoding"),
                                           ("beams0", "at least 1"), (",", "names no")])
def test_bad_decode_lists(spec, message):
    with pytest.raises(InstructlmError, match=message):
        parse_decodes(spec, 50)


def test_decode_lists():
    decodes = dict(parse_decodes("greedy, beams5,sample0.9,sample", 50))
    assert decodes["beams5"].beams == 5 and not decodes["beams5"].sample
    assert decodes["sample0.9"].sample and decodes["sample0.9"].temperature == 0.9
    assert decodes["sample"].temperature == 0.7 and decodes["greedy"].max_new_tokens == 50


def test_curve_trains_growing_subsets_and_plots(tmp_path, tiny_base, capsys):
    data = tmp_path / "facts.txt"
    data.write_text(FACTS, encoding="utf-8")
    out = tmp_path / "curve"
    assert main(["curve", str(data), "--sizes", "0,2,all", "--output", str(out),
                 "--base", str(tiny_base), "--template", "seed-en", "--epochs", "60",
                 "--lr", "3e-3", "--batch-size", "3", "--max-new-tokens", "12", "-q",
                 "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    assert [p["n_train"] for p in points] == [0, 2, 4]
    assert points[0]["summary"]["format"] == 0.0 and points[-1]["summary"]["format"] == 1.0
    assert points[-1]["eval_loss"] < points[0]["eval_loss"]
    png = (out / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and not parse_html(out / "report.html").external
    assert json.loads((out / "curve.json").read_text())["points"] == points


def test_spread_order_takes_every_family_before_repeating_one():
    examples = ([Example(f"Tell me a spell about {i}.", "x") for i in range(4)]
                + [Example(f"Name three {i}.", "y") for i in range(3)]
                + [Example("Hello!", "z")])
    ordered = spread_order(examples, seed=1)
    assert sorted(ordered, key=id) == sorted(examples, key=id)
    assert [family(e) for e in ordered[:3]] == ["tell me", "name three", "hello"]
    assert spread_order(examples, seed=1) == ordered  # fixed by the seed


def test_sizes():
    assert parse_sizes("4,8,all", 20) == [4, 8, 20]
    assert parse_sizes("all,0,4,4", 20) == [0, 4, 20]
    assert parse_sizes(None, 37) == [0, 4, 8, 16, 32, 37]
    assert parse_sizes(None, 3) == [0, 3]
    for bad in ("4,x", "50", "-1", ","):
        with pytest.raises(InstructlmError):
            parse_sizes(bad, 20)


def test_training_ends_with_the_scores(tmp_path, tiny_base):
    data = tmp_path / "facts.txt"
    data.write_text(FACTS, encoding="utf-8")
    said: list[str] = []
    train(data, tmp_path / "run", TrainSettings(base=str(tiny_base), **TINY), report=said.append,
          progress=False)
    assert said[-1] == "Held-out answers: format 2/2, exact 2/2, stopped 2/2, chrF 100.0"
