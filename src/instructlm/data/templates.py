"""Prompt templates: how an example is shown to the model.

A template is saved with every run, so `ask`, `eval` and `serve` ask the model exactly the
way it was taught (the tutorial's generate script did not, and its model never stopped).
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, replace
from typing import Any

from instructlm.data.formats import Example
from instructlm.errors import InstructlmError

VARIABLES = ("instruction", "input")


@dataclass(frozen=True)
class Template:
    """`text` is a format string; `input_text` is used for examples that carry an input.

    The `chat` template has no text: it renders through the tokenizer's own chat template.
    """

    name: str
    text: str | None = None
    input_text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Template":
        return cls(**data)


NAMED_TEMPLATES: dict[str, Template] = {
    "seed-de": Template(
        "seed-de",
        "Es folgt eine Anweisung, die eine Aufgabe beschreibt. Schreibe eine passende "
        "Antwort.\n\nAnweisung: {instruction}\n\nAntwort:\n",
        "Es folgt eine Anweisung, die eine Aufgabe beschreibt, zusammen mit einer Eingabe, "
        "die weiteren Kontext liefert. Schreibe eine passende Antwort.\n\n"
        "Anweisung: {instruction}\n\nEingabe: {input}\n\nAntwort:\n",
    ),
    "seed-en": Template(
        "seed-en",
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\nInstruction: {instruction}\n\nResponse:\n",
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "Instruction: {instruction}\n\nInput: {input}\n\nResponse:\n",
    ),
    "chat": Template("chat"),
}


def parse_template(spec: str) -> Template:
    """A template name from NAMED_TEMPLATES, or a custom string with `{instruction}`.

    In a custom string, `\\n` written on the command line means a newline.
    """
    if spec in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[spec]
    if "{" not in spec:
        raise InstructlmError(f"unknown template {spec!r}",
                              hint=f"use one of {', '.join(NAMED_TEMPLATES)} or a string with "
                                   "{instruction}, e.g. 'Q: {instruction}\\nA: '")
    text = spec.replace("\\n", "\n")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as err:
        raise InstructlmError(f"template {spec!r} is not a valid format string: {err}",
                              hint="write literal braces as {{ and }}") from None
    unknown = sorted(fields - set(VARIABLES))
    if unknown:
        raise InstructlmError(f"template has unknown variables: {', '.join(unknown)}",
                              hint="a template may use {instruction} and {input}")
    if "instruction" not in fields:
        raise InstructlmError("Missing variables: {instruction}",
                              hint="a custom template must contain {instruction}")
    return Template("custom", text, text if "input" in fields else None)


def render_prompt(template: Template, example: Example, tokenizer: Any = None) -> str:
    """The text the model sees before the response."""
    if template.name == "chat":
        return _render_chat(example, tokenizer)
    if example.input:
        if template.input_text is None:
            raise InstructlmError(
                f"{example.source}: the example has an input, but the template has no "
                "{input}", hint="add {input} to the template or use a named template")
        return template.input_text.format(instruction=example.instruction, input=example.input)
    assert template.text is not None
    return template.text.format(instruction=example.instruction, input="")


# Stands for the instruction where a prompt is cut around it; no template holds it by itself.
_MARK = "\x00instruction\x00"


def around_instruction(template: Template, example: Example,
                       tokenizer: Any = None) -> tuple[str, str] | None:
    """The prompt for `example` (its conversation, any instruction) as the text before the
    instruction and the text after it; None if the template does not show it exactly once."""
    prompt = render_prompt(template, replace(example, instruction=_MARK), tokenizer)
    if prompt.count(_MARK) != 1:
        return None
    before, after = prompt.split(_MARK)
    return before, after


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_chat(example: Example, tokenizer: Any) -> str:
    if tokenizer is None or not has_chat_template(tokenizer):
        raise InstructlmError("the base model's tokenizer has no chat template",
                              hint="use --template seed-en, seed-de or a custom string")
    user = example.instruction + (f"\n\n{example.input}" if example.input else "")
    messages = [*example.history, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def default_template(tokenizer: Any) -> Template:
    """How to ask an untuned model: its own chat template when it has one, else seed-en."""
    return NAMED_TEMPLATES["chat" if has_chat_template(tokenizer) else "seed-en"]


def training_template(tokenizer: Any, examples: list[Example], lora: bool = False) -> Template:
    """The template a new run is taught in when none is given (docs/benchmarks.md, the
    suite): a full fine-tune in seed-en, whose plain fixed words taught unseen files' formats
    more surely than the base model's chat template with its system prompt; LoRA, which
    changes the model less, in the chat template the base model already knows (in seed-en it
    lost more answers); and the chat template wherever examples carry earlier turns or a
    system message, which only it shows."""
    if not has_chat_template(tokenizer):
        return NAMED_TEMPLATES["seed-en"]
    if lora or any(ex.history for ex in examples):
        return NAMED_TEMPLATES["chat"]
    return NAMED_TEMPLATES["seed-en"]


def template_to_teach(spec: str, tokenizer: Any, examples: list[Example], lora: bool = False,
                      base_template: Template | None = None) -> Template:
    """The template `train` teaches in: `spec` when it is not "auto"; else a tuned run given
    as the base (whose template is `base_template`) goes on in its own template, and a new
    run gets `training_template`'s."""
    if spec != "auto":
        return parse_template(spec)
    if base_template is not None:
        return base_template
    return training_template(tokenizer, examples, lora)


def unshown_turns(template: Template, examples: list[Example]) -> list[str]:
    """A warning when examples carry earlier chat turns that `template` does not show."""
    if template.name != "chat" and any(ex.history for ex in examples):
        return [f"earlier chat turns are not shown by the {template.name} template; use "
                "--template chat to train on them"]
    return []


def choose_template(spec: str | None, tokenizer: Any) -> Template:
    """`spec` parsed, or the default for this tokenizer when it is None or "auto"."""
    return default_template(tokenizer) if spec in (None, "auto") else parse_template(spec)
