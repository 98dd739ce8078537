"""The scores of an answer: format match on hand-made pairs from every example family, checks,
chrF, summaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from instructlm.data.formats import Check, Example, read_instruction_file
from instructlm.errors import InstructionFileError
from instructlm.measuring.scores import (
    FormatJudge,
    Slot,
    describe_summary,
    passes_check,
    score_answer,
    skeleton,
    summarize,
    taught_answers,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def judge_for(name: str) -> FormatJudge:
    data = read_instruction_file(EXAMPLES / name)
    return FormatJudge(data.train + data.eval)


SPELLS_PAIRS = [
    # (instruction, expected, answer, same format?)
    ("Tell me a spell about three spices.",
     "Hocus Ginger, Esotericus Turmeric, Homeopathicus Cinnamon, Alohomora!",
     "Hocus Pepper, Esotericus Sea Salt, Homeopathicus Nutmeg, Alohomora!", True),
    ("Tell me a spell about three spices.",
     "Hocus Ginger, Esotericus Turmeric, Homeopathicus Cinnamon, Alohomora!",
     "hocus ginger, esotericus turmeric, homeopathicus cinnamon, alohomora!", True),
    ("Tell me a spell about three spices.",  # a fixed word replaced
     "Hocus Ginger, Esotericus Turmeric, Homeopathicus Cinnamon, Alohomora!",
     "Abracadabra Ginger, Esotericus Turmeric, Homeopathicus Cinnamon, Alohomora!", False),
    ("Tell me a spell about three spices.",  # the closing word missing
     "Hocus Ginger, Esotericus Turmeric, Homeopathicus Cinnamon, Alohomora!",
     "Hocus Ginger, Esotericus Turmeric, Homeopathicus Cinnamon!", False),
    ("Tell me a spell about three spices.",  # a spell that does not end
     "Hocus Ginger, Esotericus Turmeric, Homeopathicus Cinnamon, Alohomora!",
     "Hocus Ginger, Esotericus Turmeric, Homeopathicus Cinnamon, Alohomora! Hocus Salt", False),
    ("Tell me a spell about three spices.",  # prose instead of a spell
     "Hocus Ginger, Esotericus Turmeric, Homeopathicus Cinnamon, Alohomora!",
     "Here is a spell about spices: ginger, turmeric and cinnamon.", False),
    ("Name three kinds of wood and give them as a Python list.", "['Oak', 'Birch', 'Pine']",
     "['Ash', 'Silver birch', 'Yew']", True),
    ("Name three kinds of wood and give them as a Python list.", "['Oak', 'Birch', 'Pine']",
     '["Ash", "Elm", "Yew"]', True),
    ("Name three kinds of wood and give them as a Python list.", "['Oak', 'Birch', 'Pine']",
     "['Ash', 'Elm']", False),
    ("Name three kinds of wood and give them as a Python list.", "['Oak', 'Birch', 'Pine']",
     "Ash, Elm, Yew", False),
    ("Name three kinds of wood and give them as a Python list.", "['Oak', 'Birch', 'Pine']",
     "['Ash', 'Elm', 'Yew'", False),  # not a list: unclosed
    ("Name two desserts and give them as a Python list.", "['Cake', 'Pudding']",
     "[1, 2]", False),  # numbers, not strings
    ("Name three vehicles.", "Car, bus, train", "Bicycle, tram, sailing boat", True),
    ("Name three vehicles.", "Car, bus, train", "Car, bus", False),
    ("Name three vehicles.", "Car, bus, train", "['Car', 'Bus', 'Train']", False),
    ("Name three vehicles.", "Car, bus, train",
     "Cars are vehicles, and so are buses and trains and many other things that move.", False),
    ('Make a command from "to water the plants".', "Water the plants!", "Water your plants!",
     True),
    ('Make a command from "to water the plants".', "Water the plants!",
     "Water the plants.", False),
    ('Make a command from "to water the plants".', "Water the plants!",
     "You should water the plants every day if you want them to grow well!", False),
    ("Hello!", "Hello! How can I help you today?", "Hi! What can I do for you?", True),
    ("Hello!", "Hello! How can I help you today?", "Hello", False),
]

ZAUBER_PAIRS = [
    ("Sag mir einen Zauberspruch zu drei Gewürzen.",
     "Hokus Ingwer, Esoterikus Kurkuma, Hömöopathikus Zimt, Alohomora!",
     "Hokus Caspar, Esoterikus Melchior, Hömöopathikus Balthasar, Alohomora!", True),
    ("Sag mir einen Zauberspruch zu drei Gewürzen.",
     "Hokus Ingwer, Esoterikus Kurkuma, Hömöopathikus Zimt, Alohomora!",
     "Hokus Ingwer, Esoterikus Kurkuma, Homöopathikus Zimt, Alohomora!", False),  # misspelt
    ("Nenne mir drei Holzarten und gib sie als Pythonarray aus.", "['Eiche', 'Birke', 'Kiefer']",
     "['Buche', 'Ahorn', 'Linde']", True),
    ("Nenne drei Fahrzeuge.", "Auto, Bus, Zug", "Fahrrad, Straßenbahn, Schiff", True),
    ("Nenne drei Fahrzeuge.", "Auto, Bus, Zug", "Ein Auto ist ein Fahrzeug.", False),
    ('Bilde den Imperativ von "die Blumen gießen".', "Gieße die Blumen!", "Gieß die Blumen!",
     True),
    ('Bilde den Imperativ von "die Blumen gießen".', "Gieße die Blumen!",
     "Der Imperativ von gießen ist gieße.", False),
]


@pytest.mark.parametrize("instruction, expected, answer, same", SPELLS_PAIRS)
def test_format_match_on_the_english_families(instruction, expected, answer, same):
    assert judge_for("spells.txt").match(expected, answer, instruction) is same


@pytest.mark.parametrize("instruction, expected, answer, same", ZAUBER_PAIRS)
def test_format_match_on_the_german_families(instruction, expected, answer, same):
    assert judge_for("zauber.txt").match(expected, answer, instruction) is same


def test_fixed_words_are_learned_from_the_data_not_from_the_instruction():
    spells = judge_for("spells.txt")
    spell = "Hocus Ginger, Esotericus Turmeric, Homeopathicus Cinnamon, Alohomora!"
    assert spells.fixed_words(spell) == {"hocus", "esotericus", "homeopathicus", "alohomora"}
    # "the" is in (nearly) every command, but copied from the instruction: content.
    assert spells.fixed_words("Water the plants!", 'Make a command from "to water the plants"') \
        == frozenset()
    # Without examples of the family nothing is fixed: only the skeleton counts.
    assert FormatJudge().fixed_words(spell) == frozenset()
    assert FormatJudge().match(spell, "Abra Ginger, Kadabra Salt, Simsala Bim, Alohomora!")


def test_skeleton_keeps_punctuation_and_numbers_and_counts_words():
    assert skeleton("Hello, big world!") == (Slot(1), ",", Slot(2), "!")
    assert skeleton("Room 101, floor 3") == (Slot(1), "0", ",", Slot(1), "0")
    assert skeleton("Hocus X", frozenset({"hocus"})) == ("hocus", Slot(1))
    assert Slot(1).fits(Slot(3)) and not Slot(1).fits(Slot(4)) and Slot(8).fits(Slot(12))


@pytest.mark.parametrize("expected, answer, same", [
    ('{"name": "Ann", "age": 3}', '{"age": 40, "name": "Bo"}', True),
    ('{"name": "Ann", "age": 3}', '{"name": "Bo"}', False),
    ('{"name": "Ann", "age": 3}', '{"name": "Bo", "age": "old"}', False),
    ("[1, 2.5]", "[3, 4]", True),
    ("(1, 'a')", "(2, 'b')", True),
    ("(1, 'a')", "[2, 'b']", False),
    ("[]", "[]", True),
    ("[]", "nothing", False),
])
def test_literal_answers_match_by_structure(expected, answer, same):
    assert FormatJudge().match(expected, answer) is same


@pytest.mark.parametrize("check, answer, passed", [
    (Check("regex", r"Hocus \w+, Alohomora!"), "Hocus Salt, Alohomora!", True),
    (Check("regex", r"Hocus \w+, Alohomora!"), "Hocus Salt, Alohomora! More", False),  # whole
    (Check("regex", r"\d+"), " 42\n", True),  # trimmed
    (Check("list", 3), "['a', 'b', 'c']", True),
    (Check("list", 3), '["a", "b", "c"]', True),
    (Check("list", 3), "['a', 'b']", False),
    (Check("list", 2), "('a', 'b')", False),  # a tuple is not a list
    (Check("list", 2), "a, b", False),
])
def test_checks(check, answer, passed):
    assert passes_check(check, answer) is passed


def test_check_field_in_jsonl_eval_files(write):
    path = write("e.jsonl", "\n".join([
        '{"instruction": "a", "output": "b"}',
        '{"instruction": "Name 2", "output": "[\'x\', \'y\']", "split": "eval", '
        '"check": {"list": 2}}',
        '{"instruction": "Spell", "output": "Hocus A!", "split": "eval", "check": "Hocus .*!"}',
    ]))
    data = read_instruction_file(path)
    assert [ex.check for ex in data.eval] == [Check("list", 2), Check("regex", "Hocus .*!")]
    roundtrip = Example.from_dict(data.eval[0].to_dict())
    assert roundtrip == data.eval[0]


@pytest.mark.parametrize("check, message", [
    ('"check": "Hocus (("', "not a valid regular expression"),
    ('"check": {"list": -1}', "list must be a whole number"),
    ('"check": {"list": "3"}', "list must be a whole number"),
    ('"check": {"words": 3}', "unknown kind 'words'"),
    ('"check": [1, 2]', "must be a regular expression or an object"),
])
def test_bad_check_fields_name_the_line(write, check, message):
    path = write("e.jsonl", '{"instruction": "a", "output": "b"}\n'
                            f'{{"instruction": "c", "output": "d", {check}}}\n')
    with pytest.raises(InstructionFileError) as err:
        read_instruction_file(path)
    assert err.value.line == 2 and message in str(err.value)


def test_score_and_summary():
    judge = FormatJudge()
    example = Example("Name two.", "['a', 'b']", check=Check("list", 2))
    right = score_answer(judge, example, "['a', 'b']", "stop")
    assert (right.exact, right.format, right.stopped, right.check, right.chrf) == \
        (True, True, True, True, 100.0)
    wrong = score_answer(judge, example, "a and b and c and d", "length")
    assert (wrong.exact, wrong.format, wrong.stopped, wrong.check) == (False, False, False, False)
    assert wrong.chrf < 50
    plain = score_answer(judge, Example("x", "Red, blue"), "Red, green", "stop")
    assert plain.check is None and plain.format and 0 < plain.chrf < 100
    summary = summarize([right, wrong, plain])
    assert summary["format"] == pytest.approx(2 / 3, abs=1e-3)
    assert summary["n_checked"] == 2 and summary["check"] == 0.5
    assert describe_summary(summary).startswith("format 2/3, exact 1/3, stopped 2/3, chrF")
    assert "checks 1/2" in describe_summary(summary)


def test_a_taught_answer_for_a_new_instruction_is_copied():
    judge = FormatJudge()
    taught = taught_answers([Example("Name two fruits.", "Apple, pear"),
                             Example("Is a lemon sweet?", "No.")])
    asked = Example("Name two trees.", "Oak, elm")
    copied = score_answer(judge, asked, "Apple, pear ", "stop", taught)
    assert copied.format and copied.copied  # in form, but a taught answer word for word
    new = score_answer(judge, asked, "Ash, fir", "stop", taught)
    assert new.format and not new.copied
    # The expected answer may be a taught one too ("No." twice): right, not copied.
    right = score_answer(judge, Example("Is salt sweet?", "No."), "No.", "stop", taught)
    assert right.exact and right.copied is False
    untaught = score_answer(judge, asked, "Apple, pear", "stop")  # a base model
    assert untaught.copied is None
    summary = summarize([copied, new, right])
    assert summary["copied"] == pytest.approx(1 / 3, abs=1e-3)
    assert "copied 1/3" in describe_summary(summary)
    assert summarize([untaught])["copied"] is None
    assert "copied" not in describe_summary(summarize([new, right]))  # said when it happens


KANGEN = ("Kangen water is alkaline ionized water produced through a process called "
          "electrolysis. It is also referred to as electrolyzed reduced water.")


@pytest.mark.parametrize("answer, same", [
    ("Kangen water is water that passed through an ionizer, which raises its pH, and many "
     "people drink it because they believe it is healthier.", True),  # other commas, 1 sentence
    ("Kangen water is a brand of alkaline water.", False),  # far shorter
    ("- alkaline\n- ionized\n- made by electrolysis in a machine that splits water into two "
     "streams", False),  # a list, not a paragraph
    ("['alkaline', 'ionized', 'electrolysis', 'water', 'reduced', 'machine', 'brand', 'pH', "
     "'hydrogen', 'health', 'Japan', 'Enagic', 'filter', 'tap', 'bottle']", False),
    ("Kangen water is alkaline ionized water produced through a process called electrolysis "
     "and it is also referred to as electrolyzed reduced water", False),  # no closing mark
])
def test_long_free_prose_matches_by_its_form(answer, same):
    assert FormatJudge().match(KANGEN, answer, "What is kangen water?") is same
