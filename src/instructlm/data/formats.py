"""Instruction files -> examples.

Two families of files are read:

* the tutorial's text format: one `instruction#response` a line, `#` comment lines, blank
  lines skipped, a comment containing `_EVAL_` starting the evaluation part, `\\#` for a
  literal `#`; read for preference tuning, a line is `instruction#chosen#rejected`;
* JSONL, whose flavour is detected from the first record's keys (see `JSONL_FLAVOURS`),
  TRL's preference records (`prompt`, `chosen`, `rejected`) among them.

Everything that is wrong with a file is reported as `file:line: what, and what to do`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from instructlm.errors import CONTROL, InstructionFileError

EVAL_MARKER = "_EVAL_"
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}


@dataclass(frozen=True)
class Check:
    """An explicit test of an answer, from a JSONL record's `check` field.

    `"check": "REGEX"` or `{"regex": "REGEX"}`: the whole answer must match the expression.
    `{"list": N}`: the answer must be a JSON or Python list of N items.
    """

    kind: str  # "regex" | "list"
    value: str | int

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: self.value}


@dataclass(frozen=True)
class Example:
    """One taught instruction: what is asked, optional input, the expected response."""

    instruction: str
    response: str
    input: str = ""
    # Earlier chat turns (role/content dicts) before the instruction, from `messages` records.
    history: tuple[dict[str, str], ...] = ()
    source: str = ""  # "file:line", for messages that point back to the file
    check: Check | None = None
    # A preference pair: `response` is the chosen answer and this the rejected one.
    rejected: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["history"] = list(self.history)
        data["check"] = self.check.to_dict() if self.check else None
        if not self.rejected:  # only pairs carry it
            del data["rejected"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Example":
        check = parse_check(data["check"]) if data.get("check") is not None else None
        return cls(data["instruction"], data["response"], data.get("input", ""),
                   tuple(data.get("history", ())), data.get("source", ""), check,
                   data.get("rejected", ""))


@dataclass
class InstructionSet:
    """The parsed file: a training part, an evaluation part, and what looked odd."""

    path: str
    format: str
    sha256: str
    train: list[Example]
    eval: list[Example]
    warnings: list[str] = field(default_factory=list)

    @property
    def pairs(self) -> bool:
        """Whether the file holds preference pairs (chosen and rejected answers)."""
        return any(ex.rejected for ex in self.train + self.eval)


def read_instruction_file(path: str | Path, need_train: bool = True,
                          preferences: bool = False) -> InstructionSet:
    """Read a text or JSONL instruction file; raise InstructionFileError on any problem.

    `need_train=False` accepts a file of evaluation examples only (for `eval RUN FILE`).
    `preferences=True` reads preference pairs: a text line is `instruction#chosen#rejected`
    (every training line; an evaluation line may be a plain `instruction#response`), and a
    JSONL file must hold TRL's prompt/chosen/rejected records. Without it, a JSONL file of
    pairs is refused, and text lines keep everything after their first `#` as the response.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise InstructionFileError(name, None, "no such file",
                                   hint="check the path; instruction files are plain text "
                                        "(instruction#response a line) or JSONL")
    if path.is_dir():
        raise InstructionFileError(name, None, "is a folder, not an instruction file")
    if not path.is_file():  # a pipe would block, a device such as /dev/zero never end
        raise InstructionFileError(name, None, "is not a regular file",
                                   hint="save the instructions to a file and give its path")
    raw = path.read_bytes()
    text = _decode_utf8(raw, name)
    lines = text.split("\n")
    if path.suffix.lower() in JSONL_SUFFIXES:
        fmt, pairs = _parse_jsonl(lines, name)
    else:
        fmt, pairs = "text", _parse_text(lines, name, preferences)
    train = [ex for ex, split in pairs if split == "train"]
    evals = [ex for ex, split in pairs if split == "eval"]
    _check_kind(name, fmt, pairs, preferences)
    _refuse_control_characters(name, lines, pairs)
    if not evals and not train:
        raise InstructionFileError(name, None, "no examples",
                                   hint="write one example a line as instruction#response")
    if not train and need_train:
        raise InstructionFileError(
            name, None, "only evaluation examples: there is nothing to train on",
            hint="write one example a line as instruction#response (training lines come "
                 f"before a '# {EVAL_MARKER}' comment)")
    warnings = (_find_conflicts(train + evals) + _equal_pairs(train + evals)
                + _looks_like_pairs(name, fmt, lines, preferences))
    return InstructionSet(name, fmt, hashlib.sha256(raw).hexdigest(), train, evals, warnings)


def _decode_utf8(raw: bytes, name: str) -> str:
    """Decode strictly as UTF-8 (a BOM is allowed); refuse anything else with its line.

    We refuse rather than guess Windows-1252: a wrong guess would silently teach the model
    mangled umlauts, and re-saving the file as UTF-8 is a one-step fix.
    """
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = raw.count(b"\n", 0, err.start) + 1
        column = err.start - raw.rfind(b"\n", 0, err.start)
        line = raw.split(b"\n")[line_no - 1].rstrip(b"\r")
        shown = line.decode("utf-8", errors="replace")
        try:
            guess = f" (as Windows-1252 it would read: {line.decode('cp1252')!r})"
        except UnicodeDecodeError:
            guess = ""
        raise InstructionFileError(
            name, line_no,
            f"not valid UTF-8: byte 0x{raw[err.start]:02x} at column {column}{guess}", shown,
            hint="save the file as UTF-8, e.g. `iconv -f WINDOWS-1252 -t UTF-8 "
                 "in.txt > out.txt`") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- the tutorial's text format -------------------------------------------------------------

def split_fields(line: str, splits: int = 1) -> list[str]:
    """Split at the first `splits` `#` that are not written `\\#`; unescape `\\#` in every
    field. Fewer fields come back when the line has fewer `#`."""
    parts, buf, i = [], [], 0
    while i < len(line):
        if line.startswith("\\#", i):
            buf.append("#")
            i += 2
        elif line[i] == "#" and len(parts) < splits:
            parts.append("".join(buf))
            buf = []
            i += 1
        else:
            buf.append(line[i])
            i += 1
    return [*parts, "".join(buf)]


def split_escaped(line: str) -> tuple[str, str] | None:
    """Split at the first `#` that is not written `\\#`; unescape `\\#` on both sides."""
    fields = split_fields(line)
    return (fields[0], fields[1]) if len(fields) == 2 else None


def _parse_text(lines: list[str], name: str, preferences: bool) -> list[tuple[Example, str]]:
    split = "train"
    shape = "instruction#chosen#rejected" if preferences else "instruction#response"
    out: list[tuple[Example, str]] = []
    for no, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            if EVAL_MARKER in stripped:
                split = "eval"
            continue
        fields = [f.strip() for f in split_fields(stripped, 2 if preferences else 1)]
        if len(fields) == 1:
            raise InstructionFileError(
                name, no, "no '#' between instruction and response", line,
                hint=f"write {shape}; a '#' that belongs to the text is written \\#")
        if preferences and len(fields) == 2 and split == "train":
            raise InstructionFileError(
                name, no, "no rejected answer: preference tuning learns from pairs", line,
                hint="write instruction#chosen#rejected: the answer to prefer, then the one "
                     "to avoid (a plain instruction#response may follow the _EVAL_ comment)")
        sides = ("instruction", "chosen answer", "rejected answer") if preferences \
            else ("instruction", "response")
        for side, value in zip(sides, fields):
            if not value:
                raise InstructionFileError(name, no, f"empty {side}", line,
                                           hint=f"write {shape}, every part non-empty")
        instruction, response, *rejected = fields
        out.append((Example(instruction, response, source=f"{name}:{no}",
                            rejected="".join(rejected)), split))
    return out


def _check_kind(name: str, fmt: str, pairs: list[tuple[Example, str]],
                preferences: bool) -> None:
    """Pairs are read only for preference tuning, and preference tuning needs pairs."""
    if preferences and fmt.startswith("jsonl") and fmt != "jsonl-preference":
        raise InstructionFileError(
            name, None, f"holds {fmt.removeprefix('jsonl-')} records, not preference pairs",
            hint='preference tuning reads records of {"prompt", "chosen", "rejected"}, or '
                 "text lines instruction#chosen#rejected")
    if not preferences and any(ex.rejected for ex, _ in pairs):
        raise InstructionFileError(
            name, None, "holds preference pairs (prompt, chosen, rejected)",
            hint="train them with --method dpo (from a tuned run: --base RUN) or "
                 "--method orpo; inspect them with --pairs")


def _looks_like_pairs(name: str, fmt: str, lines: list[str], preferences: bool) -> list[str]:
    """A warning when every line of a text file read for supervised training holds a second
    `#`: likely preference lines given to the wrong method."""
    if preferences or fmt != "text":
        return []
    rows = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    if len(rows) < 2 or not all(len(split_fields(s, 2)) == 3 for s in rows):
        return []
    return [f"{name}: every line holds a second '#', kept as part of the response; if these "
            "are preference lines (instruction#chosen#rejected), train with --method dpo or "
            "orpo, and if the responses hold a '#', write it \\# to silence this"]


# --- JSONL ----------------------------------------------------------------------------------

def _from_alpaca(rec: dict[str, Any]) -> dict[str, Any]:
    return {"instruction": rec["instruction"], "input": rec.get("input") or "",
            "response": rec["output"]}


def _from_dolly(rec: dict[str, Any]) -> dict[str, Any]:
    return {"instruction": rec["instruction"], "input": rec.get("context") or "",
            "response": rec["response"]}


def _from_prompt_completion(rec: dict[str, Any]) -> dict[str, Any]:
    return {"instruction": rec["prompt"], "response": rec["completion"]}


def _from_preference(rec: dict[str, Any]) -> dict[str, Any]:
    """TRL's preference records: prompt, chosen and rejected, each a string, or chat
    messages (the prompt's ending with the user's, each answer one assistant message)."""
    prompt, history = rec["prompt"], ()
    if isinstance(prompt, list):
        if not prompt or not isinstance(prompt[-1], dict) or prompt[-1].get("role") != "user":
            raise ValueError("a prompt of messages must end with a user message")
        history = _from_messages({"messages": [*prompt, {"role": "assistant",
                                                         "content": ""}]})["history"]
        prompt = prompt[-1]["content"]
    answers = {}
    for key in ("chosen", "rejected"):
        value = rec[key]
        if isinstance(value, list):
            if len(value) != 1 or not isinstance(value[0], dict) \
                    or value[0].get("role") != "assistant":
                raise ValueError(f"{key} must be a string or one assistant message")
            value = value[0].get("content")
        answers[key] = value
    return {"instruction": prompt, "response": answers["chosen"],
            "rejected": answers["rejected"], "history": history}


def _from_messages(rec: dict[str, Any]) -> dict[str, Any]:
    messages = rec["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    for m in messages:
        if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)):
            raise ValueError("each message needs a role (system, user or assistant) and a "
                             "string content")
    if messages[-1]["role"] != "assistant" or len(messages) < 2 \
            or messages[-2]["role"] != "user":
        raise ValueError("'messages' must end with a user message followed by the "
                         "assistant's answer, which is what is taught")
    history = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-2])
    return {"instruction": messages[-2]["content"], "response": messages[-1]["content"],
            "history": history}


# Flavour name -> (keys that identify it, converter to Example fields). First match wins.
JSONL_FLAVOURS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "messages": (("messages",), _from_messages),
    "preference": (("prompt", "chosen", "rejected"), _from_preference),
    "alpaca": (("instruction", "output"), _from_alpaca),
    "dolly": (("instruction", "response"), _from_dolly),  # `context` optional
    "prompt-completion": (("prompt", "completion"), _from_prompt_completion),
}


# A flavour's own name for an Example field, for errors that name what the user wrote.
_FIELD_NAMES = {"preference": {"instruction": "prompt", "response": "chosen"},
                "alpaca": {"response": "output"}, "dolly": {"input": "context"},
                "prompt-completion": {"instruction": "prompt", "response": "completion"}}


def _field_name(flavour: str, key: str) -> str:
    return _FIELD_NAMES.get(flavour, {}).get(key, key)


def _detect_flavour(rec: dict[str, Any], name: str, no: int) -> str:
    for flavour, (keys, _) in JSONL_FLAVOURS.items():
        if all(k in rec for k in keys):
            return flavour
    known = "; ".join("+".join(keys) for keys, _ in JSONL_FLAVOURS.values())
    raise InstructionFileError(
        name, no, f"cannot tell the JSONL flavour from the keys {sorted(rec)}",
        hint=f"use one of: {known} (plus optional input/context and split)")


def _parse_jsonl(lines: list[str], name: str) -> tuple[str, list[tuple[Example, str]]]:
    flavour = None
    out: list[tuple[Example, str]] = []
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            # Text that UTF-8 cannot hold (a lone surrogate such as "\ud800") is refused
            # here, not by the tokenizer later.
            json.dumps(rec, ensure_ascii=False).encode("utf-8")
        except json.JSONDecodeError as err:
            raise InstructionFileError(name, no, f"not valid JSON ({err.msg})", line,
                                       hint="each line must be one JSON object") from None
        except UnicodeEncodeError as err:
            raise InstructionFileError(name, no, "holds text that is not Unicode: an unpaired "
                                       f"surrogate {err.object[err.start]!r}", line,
                                       hint="write the character itself, or a valid "
                                            "\\uXXXX pair") from None
        except (ValueError, RecursionError) as err:  # too deep, a number too long
            reason = ("nested too deeply" if isinstance(err, RecursionError)
                      else "a number too long" if "digits" in str(err) else str(err))
            raise InstructionFileError(name, no, f"cannot be read as JSON: {reason}", line,
                                       hint="each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise InstructionFileError(name, no, "not a JSON object", line)
        flavour = flavour or _detect_flavour(rec, name, no)
        keys, convert = JSONL_FLAVOURS[flavour]
        missing = [k for k in keys if k not in rec]
        if missing:
            raise InstructionFileError(name, no, f"missing {', '.join(missing)} (the file's "
                                       f"first record is {flavour})", line)
        try:
            fields = convert(rec)
        except ValueError as err:
            raise InstructionFileError(name, no, str(err), line) from None
        required = ("instruction", "response", "rejected") if flavour == "preference" \
            else ("instruction", "response")
        for key in ("instruction", "input", "response", "rejected"):
            value = fields.get(key, "")
            if not isinstance(value, str):
                raise InstructionFileError(name, no, f"{_field_name(flavour, key)} must be a "
                                           "string", line)
            fields[key] = value.strip()
        for key in required:
            if not fields[key]:
                raise InstructionFileError(name, no, f"empty {_field_name(flavour, key)}", line)
        split = rec.get("split", "train")
        if split not in ("train", "eval"):
            raise InstructionFileError(name, no, f"split must be \"train\" or \"eval\", "
                                       f"not {split!r}", line)
        try:
            check = parse_check(rec["check"]) if rec.get("check") is not None else None
        except ValueError as err:
            raise InstructionFileError(name, no, f"check: {err}", line,
                                       hint=CHECK_HINT) from None
        out.append((Example(**fields, source=f"{name}:{no}", check=check), split))
    return f"jsonl-{flavour}" if flavour else "jsonl", out


CHECK_HINT = ('write "check": "REGEX" (the whole answer must match) or {"list": N} (a JSON '
              'or Python list of N items)')


def parse_check(value: Any) -> Check:
    """A `check` field -> Check; ValueError says what is wrong with it."""
    if isinstance(value, str):
        value = {"regex": value}
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError("must be a regular expression or an object with one key, "
                         "regex or list")
    (kind, arg), = value.items()
    if kind == "regex":
        if not isinstance(arg, str):
            raise ValueError("regex must be a string")
        try:
            re.compile(arg)
        except re.error as err:
            raise ValueError(f"not a valid regular expression ({err})") from None
        return Check("regex", arg)
    if kind == "list":
        if not isinstance(arg, int) or isinstance(arg, bool) or arg < 0:
            raise ValueError("list must be a whole number of items, 0 or more")
        return Check("list", arg)
    raise ValueError(f"unknown kind {kind!r}: use regex or list")


# --- checks across examples -----------------------------------------------------------------

def _find_conflicts(examples: list[Example]) -> list[str]:
    """Duplicates and contradicting responses are legal but usually a mistake: warn."""
    seen: dict[tuple[str, str, tuple], Example] = {}
    warnings = []
    for ex in examples:
        key = (ex.instruction, ex.input, tuple(tuple(sorted(m.items())) for m in ex.history))
        first = seen.get(key)
        if first is None:
            seen[key] = ex
        elif first.response == ex.response:
            warnings.append(f"{ex.source}: duplicate of {first.source}")
        else:
            warnings.append(f"{ex.source}: same instruction as {first.source} with a "
                            "different response")
    return warnings


def _equal_pairs(examples: list[Example]) -> list[str]:
    """A pair whose answers are the same has nothing to prefer: its loss has no gradient."""
    return [f"{ex.source}: the chosen and the rejected answer are the same, so the pair "
            "teaches nothing; write the answer you got as the rejected one"
            for ex in examples if ex.rejected and ex.rejected == ex.response]


def _refuse_control_characters(name: str, lines: list[str],
                               pairs: list[tuple[Example, str]]) -> None:
    """Refuse a control character in any text (errors.CONTROL), with its line."""
    for ex, _ in pairs:
        texts = {"instruction": ex.instruction, "input": ex.input, "response": ex.response,
                 "rejected answer": ex.rejected,
                 **{f"{m['role']} message": m["content"] for m in ex.history}}
        for part, text in texts.items():
            found = CONTROL.search(text)
            if found:
                no = int(ex.source.rsplit(":", 1)[1])
                raise InstructionFileError(
                    name, no, f"the {part} holds a control character, "
                              f"U+{ord(found.group()):04X}", lines[no - 1],
                    hint="remove it: control characters other than tab and line breaks are "
                         "not text to teach")
