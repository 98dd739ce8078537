"""The command line end to end on the tiny model, as a user would type it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructlm.cli import main

FILE = "Say hello.#Hello!\nName three fruits.#Apple, banana, cherry\n# _EVAL_\nSay hello.#Hello!\n"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_base) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    data = folder / "greet.txt"
    data.write_text(FILE, encoding="utf-8")
    out = folder / "runs" / "greet"
    code = main(["train", str(data), "--base", str(tiny_base), "--output", str(out),
                 "--template", "seed-en", "--epochs", "60", "--lr", "3e-3", "--batch-size", "2",
                 "--quiet"])
    assert code == 0
    return out



def test_ask_arguments_plain_and_json(cli_run, capsys):
    assert main(["ask", str(cli_run), "Say hello.", "Name three fruits."]) == 0
    assert capsys.readouterr().out.splitlines() == ["Hello!", "Apple, banana, cherry"]
    assert main(["ask", str(cli_run), "--json", "Say hello."]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec == {"instruction": "Say hello.", "response": "Hello!", "finish_reason": "stop",
                   "new_tokens": rec["new_tokens"]} and rec["new_tokens"] > 0


def test_ask_reads_stdin_one_instruction_a_line(cli_run, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Say hello.\n\nName three fruits.\n"))
    assert main(["ask", str(cli_run), "--json", "--beams", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["response"] for x in lines] == ["Hello!", "Apple, banana, cherry"]
    assert all(x["finish_reason"] == "stop" for x in lines)


@pytest.mark.parametrize("command", ["ask", "eval", "compare", "serve"])
def test_answering_commands_take_a_device_and_refuse_one_not_here(cli_run, capsys, command):
    args = {"ask": ["x"], "eval": [], "compare": [], "serve": ["--port", "0"]}[command]
    assert main([command, str(cli_run), *args, "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err
    assert "no such CUDA device" in err and "Traceback" not in err


def test_ask_on_the_cpu_answers_as_auto_does_here(cli_run, capsys):
    assert main(["ask", str(cli_run), "--device", "cpu", "Say hello."]) == 0
    assert capsys.readouterr().out.splitlines() == ["Hello!"]


def test_ask_a_base_model_directly(tiny_base, capsys):
    assert main(["ask", str(tiny_base), "--json", "--max-new-tokens", "3", "Hi"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["instruction"] == "Hi" and rec["new_tokens"] <= 3


def test_run_refuses_template_override(cli_run, capsys):
    assert main(["ask", str(cli_run), "--template", "seed-de", "x"]) == 2
    assert "only for base models" in capsys.readouterr().err


def test_train_output_and_existing_run(cli_run, tiny_base, capsys):
    data = cli_run.parent.parent / "greet.txt"
    code = main(["train", str(data), "--base", str(tiny_base), "--output", str(cli_run), "-q"])
    assert code == 2
    assert "already holds a trained run" in capsys.readouterr().err


def test_inspect_json(tmp_path, tiny_base, capsys):
    f = tmp_path / "d.txt"
    f.write_text("a#b\na#c\n# _EVAL_\nx \\# y#z\n", encoding="utf-8")
    assert main(["inspect", str(f), "--base", str(tiny_base), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["instruction"] for e in report["train"]] == ["a", "a"]
    assert report["eval"][0]["instruction"] == "x # y"
    assert report["train"][0]["source"].endswith("d.txt:1")
    assert len(report["warnings"]) == 1
    stats = report["token_stats"]["train"]
    assert 0 < stats["min"] <= stats["mean"] <= stats["max"]
    assert report["template"] == "seed-en"  # as train counts them


def test_inspect_counts_conversations_in_the_chat_template_as_train_does(tmp_path, tiny_base,
                                                                          capsys):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Name a fruit."},
                                          {"role": "assistant", "content": "Apple"}]}) + "\n",
                 encoding="utf-8")
    assert main(["inspect", str(f), "--base", str(tiny_base), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["template"] == "chat"


def test_inspect_counts_in_a_tuned_runs_own_template_as_train_goes_on_in_it(tmp_path, tiny_base,
                                                                              capsys):
    f = tmp_path / "d.txt"
    f.write_text("a#b\nc#d\n", encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", str(f), "--base", str(tiny_base), "--output", str(run),
                 "--template", "chat", "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(f), "--base", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["template"] == "chat"  # not the new-run seed-en


def test_inspect_text(tmp_path, capsys):
    f = tmp_path / "d.txt"
    f.write_text("a#b\n", encoding="utf-8")
    assert main(["inspect", str(f), "--no-tokens"]) == 0
    assert "1 training, 0 evaluation examples" in capsys.readouterr().out


@pytest.mark.parametrize("content, words", [
    (b"a#b\nno separator\n", "bad.txt:2: no '#' between instruction and response"),
    (b"a#\n", "bad.txt:1: empty response"),
    (b"# nothing\n", "no examples"),
    ("Köln#Dom\n".encode("cp1252"), "bad.txt:1: not valid UTF-8"),
])
def test_bad_files_give_one_clear_error(tmp_path, content, words):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "instructlm", "train", str(f)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag, value, words", [
    ("--epochs", "0", "--epochs must be at least 1"),
    ("--lr", "-1", "--lr must be above 0"),
    ("--layer-decay", "0", "--layer-decay must be in (0, 1]"),
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--prompt-loss", "--method=dpo", "--prompt-loss must be off for --method dpo and orpo"),
    ("--loss-average=example", "--method=orpo",
     "--loss-average must be token for --method dpo and orpo"),
])
def test_bad_settings_are_refused(tmp_path, capsys, flag, value, words):
    f = tmp_path / "a.txt"
    f.write_text("a#b\n", encoding="utf-8")
    assert main(["train", str(f), flag, value]) == 2
    assert words in capsys.readouterr().err


def test_missing_file_and_bad_base(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "instructlm", "train", "nope.txt"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "nope.txt: no such file" in proc.stderr
    f = tmp_path / "a.txt"
    f.write_text("a#b\n")
    proc = subprocess.run([sys.executable, "-m", "instructlm", "train", str(f), "--base",
                           "./no-such-model"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "no such model folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_hub_id_is_one_line(tmp_path):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "instructlm", "ask", "someone/some-model", "hi"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "cannot load 'someone/some-model'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [[], ["train"], ["ask"], ["inspect"]])
def test_every_command_has_help(command):
    proc = subprocess.run([sys.executable, "-m", "instructlm", *command, "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: instructlm" in proc.stdout
    if not command:
        for name in ("train", "ask", "inspect"):
            assert name in proc.stdout


def test_ctrl_c_stops_training_and_says_nothing_was_saved(tmp_path, tiny_base):
    import signal
    import time

    f = tmp_path / "a.txt"
    f.write_text("a#b\nc#d\n", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "instructlm", "train", str(f), "--base",
                             str(tiny_base), "--epochs", "100000", "--template", "seed-en"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    first = proc.stdout.readline()  # "Training ..." is printed once the loop starts
    assert first.startswith("Training"), first + proc.stderr.read()
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Interrupted: runs/a is as it was before. Nothing was saved" in out
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "a").exists()
    assert not list((tmp_path / "runs").glob(".a.*"))  # staging folder removed


def test_sigterm_ends_a_training_as_ctrl_c_does(tmp_path, tiny_base, monkeypatch, capsys):
    """`kill` (or a container's stop) during a step: the step ends, no other begins, and
    the folders and the lock are tidied as after Ctrl-C."""
    import os
    import signal

    from instructlm.training.optimize import TrainStep

    real, calls = TrainStep.__call__, []

    def call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", call)
    (tmp_path / "a.txt").write_text("a#b\nc#d\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    def outside(signum, frame):  # where train handles no SIGTERM, the test fails, not dies
        raise AssertionError("SIGTERM was not handled by the training")

    previous = signal.signal(signal.SIGTERM, outside)
    try:
        code = main(["train", "a.txt", "--base", str(tiny_base), "--epochs", "50", "--quiet"])
        assert signal.getsignal(signal.SIGTERM) is outside
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130
    assert "Interrupted: runs/a is as it was before. Nothing was saved" in capsys.readouterr().out
    assert len(calls) == 2
    assert not (tmp_path / "runs" / "a").exists() and not list((tmp_path / "runs").glob(".a.*"))


def test_bad_decoding_and_incomplete_model_folder(tmp_path, capsys):
    assert main(["ask", "embedded", "--beams", "0", "x"]) == 2
    assert "--beams and --max-new-tokens must be at least 1" in capsys.readouterr().err
    # So low a temperature overflows the logits: refused before any model is loaded.
    assert main(["ask", "embedded", "--sample", "--temperature", "1e-100", "x"]) == 2
    assert "--temperature must be at least 0.001" in capsys.readouterr().err
    folder = tmp_path / "half-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    proc = subprocess.run([sys.executable, "-m", "instructlm", "ask", str(folder), "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and f"cannot load {folder}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_inspect_gives_every_warning_train_gives(tmp_path, tiny_base, capsys):
    """A pair longer than --max-length, a control token written as text, equal answers:
    inspect --pairs says what train --method orpo says."""
    f = tmp_path / "pairs.txt"
    f.write_text("Say yes.#Yes.#No.\n"
                 f"{'Tell me more. ' * 40}#Sure.#No.\n"
                 "Say hi.#Hi <eos> there.#Go away.\n"
                 "Say it.#Same.#Same.\n", encoding="utf-8")
    assert main(["train", str(f), "--base", str(tiny_base), "--method", "orpo",
                 "--max-length", "64", "--epochs", "1", "--output", str(tmp_path / "run"),
                 "--quiet"]) == 0
    said_by_train = [line.removeprefix("warning: ") for line in
                     capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert main(["inspect", str(f), "--base", str(tiny_base), "--pairs", "--max-length", "64",
                 "--json"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert sorted(said_by_train) == sorted(warnings)
    assert any(":2: dropped" in w for w in warnings)
    assert any(":3: holds the model's control token" in w for w in warnings)
    assert any(":4: the chosen and the rejected answer are the same" in w for w in warnings)
