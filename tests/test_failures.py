"""No failure costs a trained run: failed swaps, full disks, killed commands and two
trainings at once; broken instruction files fail with one clear line."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_FILE, tiny_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instructlm.answering.answerer import load_answerer
from instructlm.data.encode import encode_examples
from instructlm.data.formats import Example, read_instruction_file
from instructlm.data.templates import choose_template
from instructlm.errors import InstructionFileError, InstructlmError
from instructlm.runs import output_lock
from instructlm.training import checkpoints
from instructlm.training.train import train


def quiet(message: str) -> None:
    pass


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def weights_digest(run: Path) -> str:
    return hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture
def earlier(tmp_path, tiny_base) -> Path:
    """A trained run at tmp_path/run, which the tests try to lose."""
    (tmp_path / "facts.txt").write_text(TINY_FILE, encoding="utf-8")
    return train(tmp_path / "facts.txt", tmp_path / "run",
                 tiny_settings(tiny_base, epochs=2), report=quiet, progress=False)


def retrain(tmp_path: Path, tiny_base: Path, **changes) -> Path:
    return train(tmp_path / "facts.txt", tmp_path / "run",
                 tiny_settings(tiny_base, epochs=2, seed=1, **changes), force=True,
                 report=quiet, progress=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name
                  or ".old-" in p.name)


def test_a_failed_swap_puts_the_earlier_run_back(earlier, tmp_path, tiny_base, monkeypatch):
    before = weights_digest(earlier)
    real_rename = Path.rename

    def failing(self, target):
        if ".partial-" in self.name:  # the new run taking the old one's place
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(InstructlmError, match="could not be saved"):
        retrain(tmp_path, tiny_base)
    assert weights_digest(earlier) == before
    assert load_answerer(str(earlier)).name == "run"  # loadable under its own name
    assert leftovers(tmp_path) == []


def test_a_run_a_killed_command_left_moved_aside_is_put_back(earlier, tmp_path, tiny_base):
    before = weights_digest(earlier)
    pid = dead_pid()
    earlier.rename(tmp_path / f".run.old-{pid}")  # killed between the two renames
    (tmp_path / f".run.partial-{pid}").mkdir()
    answerer = load_answerer(str(earlier))  # the next command finds it under its name
    assert answerer.name == "run" and weights_digest(earlier) == before
    assert leftovers(tmp_path) == []  # and the half-written one is gone
    (tmp_path / f".run.partial-{pid}").mkdir()
    retrain(tmp_path, tiny_base)  # the next training tidies up too
    assert leftovers(tmp_path) == []


def test_too_little_disk_space_is_refused_before_training(earlier, tmp_path, tiny_base,
                                                          monkeypatch):
    before = weights_digest(earlier)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(
        10**9, 10**9 - 1000, 1000))
    with pytest.raises(InstructlmError, match="not enough disk space"):
        retrain(tmp_path, tiny_base)
    assert weights_digest(earlier) == before


def test_a_disk_that_fills_while_saving_is_said_plainly(earlier, tmp_path, tiny_base,
                                                       monkeypatch):
    from transformers import PreTrainedModel

    before = weights_digest(earlier)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(InstructlmError, match="the disk is full"):
        retrain(tmp_path, tiny_base)
    assert weights_digest(earlier) == before and leftovers(tmp_path) == []


def test_a_failed_checkpoint_keeps_the_one_before(tmp_path, tiny_base, monkeypatch):
    import torch

    (tmp_path / "facts.txt").write_text(TINY_FILE, encoding="utf-8")
    real_save, calls = torch.save, []

    def fills_up(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: as torch reports a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up)
    with pytest.raises(InstructlmError, match="the disk is full: the checkpoint"):
        train(tmp_path / "facts.txt", tmp_path / "run",
              tiny_settings(tiny_base, epochs=4, save_every=1), report=quiet, progress=False)
    folder = checkpoints.checkpoint_dir(tmp_path / "run")
    assert checkpoints.read_about(folder)["done"] == 1
    assert leftovers(tmp_path) == []


def test_checkpoint_copies_of_killed_runs_are_removed(tmp_path, tiny_base):
    (tmp_path / "facts.txt").write_text(TINY_FILE, encoding="utf-8")
    partial = tmp_path / f"run.checkpoint.partial-{dead_pid()}"
    partial.mkdir()
    (partial / "training_state.pt").write_bytes(b"half")
    train(tmp_path / "facts.txt", tmp_path / "run", tiny_settings(tiny_base, epochs=1),
          report=quiet, progress=False)
    assert leftovers(tmp_path) == []


def test_a_second_training_into_the_same_place_is_refused(tmp_path, tiny_base):
    (tmp_path / "facts.txt").write_text(TINY_FILE, encoding="utf-8")
    with output_lock(tmp_path / "run"):
        with pytest.raises(InstructlmError, match="another training is writing"):
            train(tmp_path / "facts.txt", tmp_path / "run", tiny_settings(tiny_base),
                  report=quiet, progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.lock").exists()


def test_a_control_token_in_a_response_is_taught_as_text(tiny_tokenizer):
    template = choose_template("seed-en", tiny_tokenizer)
    example = Example("Say stop.", "Stop <eos> here", source="f.txt:3")
    (encoded,), warnings = encode_examples([example], template, tiny_tokenizer, 512)
    eos = tiny_tokenizer.eos_token_id
    assert encoded.labels.count(eos) == 1 and encoded.labels[-1] == eos
    assert warnings and "f.txt:3" in warnings[0] and "<eos>" in warnings[0]


def test_errors_show_a_bounded_excerpt_of_a_huge_line(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("x" * 5_000_000 + "\n", encoding="utf-8")
    with pytest.raises(InstructionFileError) as caught:
        read_instruction_file(path)
    assert len(str(caught.value)) < 1000 and "big.txt:1" in str(caught.value)


@pytest.mark.parametrize("line", ["[" * 10_000, '{"instruction": "a", "response": "b", "n": '
                                  + "9" * 5000 + "}",
                                  '{"instruction": "a\\ud800", "response": "b"}'])
def test_hostile_json_lines_fail_with_their_line(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(InstructionFileError, match="bad.jsonl:1"):
        read_instruction_file(path)


def test_pipes_and_devices_are_refused(tmp_path):
    import os

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(InstructionFileError, match="not a regular file"):
            read_instruction_file(path)


# --- fuzz: any file parses or fails with a clean error ----------------------------------------

PIECES = ["#", "\\#", "# _EVAL_", "\n", "\r\n", " ", "a", "ä", "\ud83d\ude00", "{", "}", "[", "]",
          '"', ":", ",", "\\", "\\u", "d800", "1e999", "9" * 50, "null", "true",
          '"instruction"', '"response"', '"messages"', '"role"', '"content"', '"user"',
          '"assistant"', '"split"', '"eval"', '"check"', '"prompt"', '"completion"', "\x00"]
TEXTS = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=5)), max_size=40).map(
    "".join)
RECORDS = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(
                                ["instruction", "response", "input", "output", "messages",
                                 "role", "content", "split", "check", "prompt", "completion",
                                 "context", "regex", "list"]), inner, max_size=4)),
    max_leaves=10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(body=st.one_of(TEXTS, st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
       suffix=st.sampled_from([".txt", ".jsonl"]))
def test_any_text_parses_or_fails_cleanly(tmp_path, body, suffix):
    check_reads_cleanly(tmp_path / f"fuzz{suffix}", body.encode("utf-8", "surrogatepass"))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(RECORDS, min_size=1, max_size=4))
def test_any_json_lines_parse_or_fail_cleanly(tmp_path, records):
    body = "\n".join(json.dumps(r) for r in records)
    check_reads_cleanly(tmp_path / "fuzz.jsonl", body.encode())


def check_reads_cleanly(path: Path, raw: bytes) -> None:
    path.write_bytes(raw)
    try:
        data = read_instruction_file(path)
    except InstructionFileError as err:
        assert str(err).startswith(str(path)) and err.message
        return
    for ex in data.train + data.eval:  # what parsed is text a tokenizer can take
        for text in (ex.instruction, ex.input, ex.response):
            assert isinstance(text, str)
            text.encode("utf-8")


def test_a_folder_written_beside_replaces_its_place_only_when_whole(tmp_path):
    from instructlm.folders import written_beside

    target = tmp_path / "place"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), written_beside(target, hidden=True) as partial:
        (partial / "new.txt").write_text("half")
        raise RuntimeError("killed while writing")
    assert [p.name for p in tmp_path.iterdir()] == ["place"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with written_beside(target, hidden=False) as partial:
        (partial / "new.txt").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["place"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]
