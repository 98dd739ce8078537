"""The run's prompt, written for other programs: a chat template for the GGUF (Jinja, as
llama.cpp and LM Studio read it) and a TEMPLATE for Ollama's Modelfile (Go's text/template).

Both must render exactly the prompt the model was trained on. A `chat` run keeps its base
model's own chat template in the GGUF; everything else is built from the run's prompt for one
instruction, cut where the instruction goes: the text before it, the instruction, the text
after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from instructlm.data.formats import Example
from instructlm.data.templates import Template, around_instruction
from instructlm.errors import InstructlmError


@dataclass(frozen=True)
class PromptFrame:
    """The run's prompt for one instruction: `before` + instruction + `after`."""

    before: str
    after: str


def prompt_frame(template: Template, tokenizer: Any) -> PromptFrame:
    parts = around_instruction(template, Example(instruction="", response=""), tokenizer)
    if parts is None:
        raise InstructlmError(f"the {template.name} template does not show the instruction "
                              "exactly once, so it cannot be written for other programs")
    return PromptFrame(*parts)


def gguf_chat_template(template: Template, tokenizer: Any) -> str:
    """A Jinja chat template that renders the run's prompt for the last message (the user's,
    when an answer is asked for)."""
    if template.name == "chat":
        return tokenizer.chat_template
    frame = prompt_frame(template, tokenizer)
    # Literal text as Jinja string literals: the block-trimming options that chat template
    # renderers turn on never touch the inside of an expression.
    return (f"{{{{ {_jinja_string(frame.before)} }}}}"
            "{{ messages[-1]['content'] }}"
            f"{{{{ {_jinja_string(frame.after)} }}}}")


def _jinja_string(text: str) -> str:
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def ollama_template(template: Template, tokenizer: Any) -> str:
    """A Modelfile TEMPLATE: the prompt around Ollama's `.Prompt` (the user's message)."""
    frame = prompt_frame(template, tokenizer)
    return f"{_go_text(frame.before)}{{{{ .Prompt }}}}{_go_text(frame.after)}"


def _go_text(text: str) -> str:
    # Go templates treat "{{" as the start of an action; written as an action that prints it.
    return text.replace("{{", '{{ "{{" }}')


def modelfile(gguf_path: str, template: Template, tokenizer: Any, stop: str | None,
              max_tokens: int) -> str:
    """An Ollama Modelfile: the GGUF (a path from the Modelfile's folder), the prompt, the
    end token, greedy answers."""
    text = ollama_template(template, tokenizer)
    if '"""' in text:
        raise InstructlmError('the prompt holds """, which an Ollama Modelfile cannot quote')
    lines = [f"FROM {gguf_path}", f'TEMPLATE """{text}"""']
    if stop:
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    # Greedy, as `instructlm ask` answers by default; Ollama's own defaults sample and
    # penalise repeats, which would change the answers.
    lines += ["PARAMETER temperature 0", "PARAMETER top_k 1", "PARAMETER repeat_penalty 1",
              f"PARAMETER num_predict {max_tokens}"]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
