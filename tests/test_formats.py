"""The instruction file parser: every format and every error path."""

from __future__ import annotations

import json

import pytest

from instructlm.data.formats import read_instruction_file, split_escaped
from instructlm.errors import InstructionFileError

TUTORIAL_STYLE = """\
# Zaubersprüche
Sage mir einen Zauberspruch zu drei Städten.#Hokus Düsseldorf, Esoterikus Köln, Hömöopathikus Essen, Alohomora!

Nenne drei Städte und gib sie als Pythonarray aus.#['München', 'Nürnberg', 'Stuttgart']
# _EVAL_
Sag mir einen Zauberspruch zu drei Gewürzen.#Hokus Ingwer, Esoterikus Kurkuma, Hömöopathikus Zimt, Alohomora!
"""


def test_text_format_splits_train_and_eval(write):
    data = read_instruction_file(write("z.txt", TUTORIAL_STYLE))
    assert data.format == "text"
    assert [e.instruction for e in data.train] == [
        "Sage mir einen Zauberspruch zu drei Städten.",
        "Nenne drei Städte und gib sie als Pythonarray aus."]
    assert data.train[1].response == "['München', 'Nürnberg', 'Stuttgart']"
    assert len(data.eval) == 1 and data.eval[0].response.startswith("Hokus Ingwer")
    assert data.train[0].source.endswith("z.txt:2")
    assert data.eval[0].source.endswith("z.txt:6")
    assert data.warnings == []


def test_without_marker_everything_is_training(write):
    data = read_instruction_file(write("a.txt", "a#b\nc#d\n"))
    assert len(data.train) == 2 and data.eval == []


@pytest.mark.parametrize("raw", [
    b"\xef\xbb\xbfHallo#Welt\r\nWie?#Gut\r\n",  # BOM + CRLF
    b"Hallo#Welt\nWie?#Gut",                    # no final newline
    b"Hallo#Welt\rWie?#Gut\r",                  # old Mac line ends
])
def test_bom_and_line_endings(write, raw):
    data = read_instruction_file(write("a.txt", raw))
    assert [(e.instruction, e.response) for e in data.train] == [("Hallo", "Welt"), ("Wie?", "Gut")]


def test_escaped_hash_on_both_sides(write):
    data = read_instruction_file(write("a.txt", r"Was ist \#1?#Platz \#1 ist # gut" + "\n"))
    ex = data.train[0]
    assert ex.instruction == "Was ist #1?"
    assert ex.response == "Platz #1 ist # gut"  # only the first unescaped # splits


def test_split_escaped():
    assert split_escaped("a#b#c") == ("a", "b#c")
    assert split_escaped(r"a\#b") is None
    assert split_escaped(r"\##x") == ("#", "x")


def test_comment_with_leading_spaces_and_marker(write):
    data = read_instruction_file(write("a.txt", "a#b\n   # _EVAL_ here\nc#d\n"))
    assert len(data.train) == 1 and len(data.eval) == 1


@pytest.mark.parametrize("content, line, words", [
    ("a#b\nno separator here\n", 2, "no '#'"),
    ("a#b\n#only comment\n  #x\n#\n", None, None),  # valid, checked below
    ("a#\n", 1, "empty response"),
    ("#c\n  #b\n", None, "no examples"),
    (" #only\n\n", None, "no examples"),
    ("x#y\n\\#a#   \n", 2, "empty response"),
])
def test_text_errors_name_file_and_line(write, content, line, words):
    path = write("bad.txt", content)
    if words is None:
        assert len(read_instruction_file(path).train) == 1
        return
    with pytest.raises(InstructionFileError) as err:
        read_instruction_file(path)
    assert words in str(err.value)
    assert err.value.line == line
    if line:
        assert f"bad.txt:{line}:" in str(err.value)


def test_indented_hash_line_is_a_comment_not_an_empty_instruction(write):
    data = read_instruction_file(write("a.txt", "a#b\n   #not an example\n"))
    assert [(e.instruction, e.response) for e in data.train] == [("a", "b")]


def test_only_eval_examples_is_an_error(write):
    with pytest.raises(InstructionFileError, match="only evaluation examples"):
        read_instruction_file(write("a.txt", "# _EVAL_\na#b\n"))


def test_windows_1252_is_refused_with_line_and_hint(write):
    path = write("win.txt", "a#b\nSage mir drei Städte.#Köln\n".encode("cp1252"))
    with pytest.raises(InstructionFileError) as err:
        read_instruction_file(path)
    msg = str(err.value)
    assert err.value.line == 2
    assert "win.txt:2: not valid UTF-8" in msg
    assert "Städte" in msg  # shows how the line would read as Windows-1252
    assert "iconv" in msg


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InstructionFileError, match="no such file"):
        read_instruction_file(tmp_path / "nope.txt")
    with pytest.raises(InstructionFileError, match="is a folder"):
        read_instruction_file(tmp_path)


def test_duplicates_and_conflicts_are_warnings(write):
    data = read_instruction_file(write("d.txt", "a#b\na#b\na#c\nx#y\n"))
    assert len(data.train) == 4
    assert data.warnings == [f"{data.path}:2: duplicate of {data.path}:1",
                             f"{data.path}:3: same instruction as {data.path}:1 with a "
                             "different response"]


def test_sha256_is_of_the_raw_bytes(write):
    import hashlib

    raw = "a#b\n".encode()
    assert read_instruction_file(write("a.txt", raw)).sha256 == hashlib.sha256(raw).hexdigest()


# --- JSONL ----------------------------------------------------------------------------------

def jsonl(*records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


@pytest.mark.parametrize("record, flavour, expected", [
    ({"instruction": "Sag hallo", "response": "Hallo"}, "dolly", ("Sag hallo", "", "Hallo")),
    ({"instruction": "Übersetze", "input": "cat", "output": "Katze"}, "alpaca",
     ("Übersetze", "cat", "Katze")),
    ({"instruction": "Fasse zusammen", "context": "Text", "response": "Kurz",
      "category": "summarization"}, "dolly", ("Fasse zusammen", "Text", "Kurz")),
    ({"prompt": "2+2=", "completion": " 4"}, "prompt-completion", ("2+2=", "", "4")),
    ({"messages": [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hallo!"}]}, "messages", ("Hi", "", "Hallo!")),
])
def test_jsonl_flavours(write, record, flavour, expected):
    data = read_instruction_file(write("d.jsonl", jsonl(record)))
    assert data.format == f"jsonl-{flavour}"
    ex = data.train[0]
    assert (ex.instruction, ex.input, ex.response) == expected


def test_jsonl_messages_keep_history(write):
    rec = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"},
                        {"role": "user", "content": "Name a fruit."},
                        {"role": "assistant", "content": "Apple"}]}
    ex = read_instruction_file(write("c.jsonl", jsonl(rec))).train[0]
    assert ex.instruction == "Name a fruit." and ex.response == "Apple"
    assert [m["role"] for m in ex.history] == ["system", "user", "assistant"]


def test_jsonl_split_field(write):
    data = read_instruction_file(write("s.jsonl", jsonl(
        {"instruction": "a", "response": "b"},
        {"instruction": "c", "response": "d", "split": "eval"},
        {"instruction": "e", "response": "f", "split": "train"})))
    assert [e.instruction for e in data.train] == ["a", "e"]
    assert [e.instruction for e in data.eval] == ["c"]


@pytest.mark.parametrize("lines, line, words", [
    ('{"instruction": "a", "response": "b"}\n{oops\n', 2, "not valid JSON"),
    ('["a", "b"]\n', 1, "not a JSON object"),
    ('{"question": "a", "answer": "b"}\n', 1, "cannot tell the JSONL flavour"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', 2, "missing output"),
    ('{"instruction": "a", "response": ""}\n', 1, "empty response"),
    ('{"instruction": "  ", "response": "b"}\n', 1, "empty instruction"),
    ('{"instruction": 3, "response": "b"}\n', 1, "instruction must be a string"),
    ('{"instruction": "a", "response": "b", "split": "test"}\n', 1, "split must be"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', 1, "must end with a user message"),
    ('{"messages": "hi"}\n', 1, "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     1, "role"),
])
def test_jsonl_errors(write, lines, line, words):
    with pytest.raises(InstructionFileError) as err:
        read_instruction_file(write("bad.jsonl", lines))
    assert words in str(err.value)
    assert f"bad.jsonl:{line}:" in str(err.value)


def test_jsonl_blank_lines_skipped(write):
    data = read_instruction_file(write("b.jsonl", '\n{"prompt": "a", "completion": "b"}\n\n'))
    assert len(data.train) == 1 and data.train[0].source.endswith("b.jsonl:2")


@pytest.mark.parametrize("name, raw, where", [
    ("nul.txt", "a#b\nSay\x00 hello.#Hello!\n", ":2"),
    ("esc.txt", "a#\x1b[31mred\n", ":1"),
    ("nul.jsonl", json.dumps({"instruction": "a", "response": "b\u0000"}) + "\n", ":1"),
    ("turn.jsonl", json.dumps({"messages": [
        {"role": "system", "content": "be \u0007 brief"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}]}) + "\n", ":1"),
])
def test_control_characters_are_refused_with_their_line(write, name, raw, where):
    with pytest.raises(InstructionFileError) as err:
        read_instruction_file(write(name, raw))
    text = str(err.value)
    assert f"{name}{where}: the " in text and "control character" in text
    assert not any(c in text for c in "\x00\x1b\x07")  # shown as escapes, never raw


def test_tabs_and_line_breaks_inside_answers_are_text(write):
    data = read_instruction_file(write("ok.jsonl", json.dumps(
        {"instruction": "a", "response": "one\ttwo\r\nthree\n"}) + "\n"))
    assert data.train[0].response == "one\ttwo\r\nthree"


@pytest.mark.parametrize("record, words", [
    ({"prompt": "a", "chosen": 5, "rejected": "c"}, "chosen must be a string"),
    ({"prompt": ["a"], "chosen": "b", "rejected": "c"}, "prompt of messages"),
    ({"prompt": 1, "chosen": "b", "rejected": "c"}, "prompt must be a string"),
    ({"instruction": "a", "output": 3}, "output must be a string"),
    ({"prompt": "a", "completion": ""}, "empty completion"),
])
def test_a_field_of_the_wrong_kind_is_named_as_the_file_names_it(write, record, words):
    with pytest.raises(InstructionFileError) as err:
        read_instruction_file(write("r.jsonl", json.dumps(record) + "\n"),
                              preferences="chosen" in record)
    assert words in str(err.value)


def test_a_pair_whose_answers_are_the_same_is_warned_about_with_its_line(write):
    data = read_instruction_file(write("p.txt", "a#yes#no\nb#same#same\n"), preferences=True)
    assert [w for w in data.warnings if "the same" in w] == [
        f"{data.path}:2: the chosen and the rejected answer are the same, so the pair "
        "teaches nothing; write the answer you got as the rejected one"]
