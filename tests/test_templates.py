"""Named and custom prompt templates."""

from __future__ import annotations

import pytest

from instructlm.data.formats import Example
from instructlm.data.templates import (
    Template,
    default_template,
    parse_template,
    render_prompt,
    training_template,
)
from instructlm.errors import InstructlmError


def test_seed_de_is_the_tutorials_prompt():
    prompt = render_prompt(parse_template("seed-de"), Example("Nenne drei Städte.", "x"))
    assert prompt.startswith("Es folgt eine Anweisung, die eine Aufgabe beschreibt. "
                             "Schreibe eine passende Antwort.")
    assert "Anweisung: Nenne drei Städte." in prompt
    assert prompt.endswith("Antwort:\n")


def test_named_template_uses_input_variant():
    t = parse_template("seed-en")
    plain = render_prompt(t, Example("Translate.", "x"))
    with_input = render_prompt(t, Example("Translate.", "x", input="Katze"))
    assert "Input:" not in plain
    assert "Input: Katze" in with_input and with_input.endswith("Response:\n")


def test_custom_template_with_newline_escape():
    t = parse_template(r"Q: {instruction}\nA:")
    assert t.name == "custom"
    assert render_prompt(t, Example("Hi?", "x")) == "Q: Hi?\nA:"


def test_custom_template_with_input():
    t = parse_template("{instruction} | {input} =>")
    assert render_prompt(t, Example("a", "x", input="b")) == "a | b =>"
    assert render_prompt(t, Example("a", "x")) == "a |  =>"


@pytest.mark.parametrize("spec, words", [
    ("Answer: {input}", "Missing variables: {instruction}"),
    ("{instruction} {foo}", "unknown variables: foo"),
    ("{instruction", "not a valid format string"),
    ("nonsense", "unknown template 'nonsense'"),
])
def test_bad_templates_are_refused(spec, words):
    with pytest.raises(InstructlmError, match=words.replace("{", r"\{").replace("}", r"\}")):
        parse_template(spec)


def test_custom_template_without_input_refuses_examples_with_input():
    t = parse_template("Q: {instruction} A:")
    with pytest.raises(InstructlmError, match="has an input"):
        render_prompt(t, Example("a", "x", input="b", source="f.jsonl:3"))


def test_chat_template_renders_through_tokenizer(tiny_tokenizer):
    ex = Example("Name a fruit.", "Apple", history=({"role": "system", "content": "Brief."},))
    prompt = render_prompt(parse_template("chat"), ex, tiny_tokenizer)
    assert prompt == "<|system|>Brief.<|end|>\n<|user|>Name a fruit.<|end|>\n<|assistant|>"


def test_chat_template_needs_one():
    class NoChat:
        chat_template = None
    with pytest.raises(InstructlmError, match="no chat template"):
        render_prompt(parse_template("chat"), Example("a", "b"), NoChat())
    assert default_template(NoChat()).name == "seed-en"


def test_a_new_run_is_taught_in_seed_en_unless_lora_or_its_examples_carry_a_conversation(
        tiny_tokenizer):
    plain = [Example("Name a fruit.", "Apple"), Example("Name a tree.", "Oak")]
    talk = [plain[0], Example("And one more?", "Pear", history=(
        {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple"}))]
    assert default_template(tiny_tokenizer).name == "chat"  # asking an untuned model
    assert training_template(tiny_tokenizer, plain).name == "seed-en"
    assert training_template(tiny_tokenizer, talk).name == "chat"
    assert training_template(tiny_tokenizer, plain, lora=True).name == "chat"

    class NoChat:
        chat_template = None
    assert training_template(NoChat(), talk).name == "seed-en"  # train warns it is not shown


def test_template_round_trips_through_dict():
    t = parse_template("Q: {instruction} {input}")
    assert Template.from_dict(t.to_dict()) == t
