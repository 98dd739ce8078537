"""Train, save, load and ask on a tiny random model: the whole data path, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_FILE, tiny_settings

from instructlm.answering.answerer import DecodeSettings, load_answerer
from instructlm.errors import InstructlmError
from instructlm.runs import RUN_FILE
from instructlm.training.train import format_answers, train

RUN_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "chat_template.jinja", RUN_FILE, "losses.jsonl",
             "data.jsonl", "README.md"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_base) -> Path:
    folder = tmp_path_factory.mktemp("runs")
    data = folder / "facts.txt"
    data.write_text(TINY_FILE, encoding="utf-8")
    return train(data, folder / "facts", tiny_settings(tiny_base), report=lambda m: None,
                 progress=False)


def test_run_directory_holds_exactly_the_contract(tiny_run):
    assert {p.name for p in tiny_run.iterdir()} == RUN_FILES
    info = json.loads((tiny_run / RUN_FILE).read_text())
    assert info["template"]["name"] == "seed-en"
    assert info["settings"]["epochs"] == 60 and info["settings"]["lr"] == 3e-3
    assert info["data"]["n_train"] == 3 and info["data"]["n_eval"] == 1
    assert len(info["data"]["sha256"]) == 64
    losses = [json.loads(line) for line in (tiny_run / "losses.jsonl").read_text().splitlines()]
    steps = [r for r in losses if "loss" in r]
    assert len(steps) == 60 and steps[-1]["loss"] < steps[0]["loss"] / 5
    assert sum("eval_loss" in r for r in losses) == 60
    assert "instructlm ask" in (tiny_run / "README.md").read_text()
    # The closing answers are scored: the tiny model memorised its one eval example.
    assert info["metrics"]["answer_scores"]["exact"] == 1.0
    assert info["metrics"]["answer_scores"]["format"] == 1.0
    assert not list(tiny_run.parent.glob(".facts.*"))  # no staging folder left behind


def test_trained_run_answers_what_it_learned_and_stops(tiny_run):
    answerer = load_answerer(str(tiny_run))
    answers = list(answerer.answer(["Name three fruits.", "Say hello.", "Tell me a spell."]))
    assert [a.response for a in answers] == ["Apple, banana, cherry", "Hello!", "Hocus Pocus!"]
    assert all(a.finish_reason == "stop" for a in answers)
    assert all(0 < a.new_tokens < 20 for a in answers)


def test_batched_answers_equal_one_at_a_time(tiny_run):
    answerer = load_answerer(str(tiny_run))
    items = ["Say hello.", "Name three fruits and more words to pad.", "Tell me a spell."]
    batched = list(answerer.answer(items, batch_size=3))
    single = [next(answerer.answer([x], batch_size=1)) for x in items]
    assert batched == single


def test_max_new_tokens_and_stop_text_give_finish_reasons(tiny_run):
    answerer = load_answerer(str(tiny_run))
    cut = next(answerer.answer(["Name three fruits."], DecodeSettings(max_new_tokens=2)))
    assert cut.finish_reason == "length" and cut.new_tokens == 2
    stopped = next(answerer.answer(["Name three fruits."], DecodeSettings(stop=(",",))))
    assert stopped.response == "Apple" and stopped.finish_reason == "stop"
    beams = next(answerer.answer(["Name three fruits."], DecodeSettings(beams=3)))
    assert beams.response == "Apple, banana, cherry"


def test_existing_run_is_kept_without_force(tiny_run, tiny_base):
    before = (tiny_run / RUN_FILE).read_bytes()
    with pytest.raises(InstructlmError, match="already holds a trained run"):
        train(tiny_run.parent / "facts.txt", tiny_run, tiny_settings(tiny_base),
              report=lambda m: None, progress=False)
    assert (tiny_run / RUN_FILE).read_bytes() == before


def test_interrupted_training_leaves_earlier_run_untouched(tiny_run, tiny_base, monkeypatch):
    import instructlm.training.optimize as optimize_module

    before = {p.name: p.read_bytes() for p in tiny_run.iterdir() if p.name != "model.safetensors"}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(optimize_module, "batch_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run.parent / "facts.txt", tiny_run, tiny_settings(tiny_base), force=True,
              report=lambda m: None, progress=False)
    assert {p.name: p.read_bytes() for p in tiny_run.iterdir()
            if p.name != "model.safetensors"} == before
    assert not list(tiny_run.parent.glob(".facts.*"))


def test_first_ctrl_c_asks_training_to_stop_after_the_step_and_a_second_stops_at_once(
        capfd):
    import os
    import signal

    from instructlm.training.fit import _ctrl_c_between_steps

    outside = signal.default_int_handler  # as in a fresh process (other tests may differ)
    original = signal.signal(signal.SIGINT, outside)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _ctrl_c_between_steps() as stop_asked:
                assert not stop_asked()
                os.kill(os.getpid(), signal.SIGINT)  # handled before the next line runs
                assert stop_asked()
                assert "Stopping after this step" in capfd.readouterr().err
                os.kill(os.getpid(), signal.SIGINT)
                pytest.fail("the second Ctrl-C did not interrupt")
        assert signal.getsignal(signal.SIGINT) is outside
        with _ctrl_c_between_steps(active=False) as stop_asked:  # several processes
            assert signal.getsignal(signal.SIGINT) is outside and not stop_asked()
    finally:
        signal.signal(signal.SIGINT, original)


def test_force_replaces_a_run_and_refuses_foreign_folders(tmp_path, tiny_base):
    data = tmp_path / "f.txt"
    data.write_text("a#b\n", encoding="utf-8")
    settings = tiny_settings(tiny_base, epochs=1)
    killed = tmp_path / ".run.partial-999999999"  # left by a run killed with SIGKILL
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    out = train(data, tmp_path / "run", settings, report=lambda m: None, progress=False)
    first = json.loads((out / RUN_FILE).read_text())["created"]
    assert not killed.exists()
    train(data, out, settings, force=True, report=lambda m: None, progress=False)
    assert (out / RUN_FILE).exists() and json.loads((out / RUN_FILE).read_text())["created"] >= first
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(InstructlmError, match="not a run; not touching it"):
        train(data, foreign, settings, force=True, report=lambda m: None, progress=False)
    assert (foreign / "cat.jpg").read_bytes() == b"meow"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_precision_learns(tmp_path, tiny_base, precision):
    data = tmp_path / "f.txt"
    data.write_text(TINY_FILE, encoding="utf-8")
    out = train(data, tmp_path / "run", tiny_settings(tiny_base, epochs=40, precision=precision),
                report=lambda m: None, progress=False)
    losses = [json.loads(x) for x in (out / "losses.jsonl").read_text().splitlines()]
    steps = [r["loss"] for r in losses if "loss" in r]
    assert steps[-1] < steps[0] / 3
    assert json.loads((out / RUN_FILE).read_text())["settings"]["precision_used"] == precision


@pytest.mark.parametrize("device, message", [
    ("cuda:7", "no such CUDA device"), ("toaster", "unknown device")])
def test_a_device_that_is_not_here_is_refused(tmp_path, tiny_base, device, message):
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has that many GPUs")
    data = tmp_path / "f.txt"
    data.write_text(TINY_FILE, encoding="utf-8")
    with pytest.raises(InstructlmError, match=message):
        train(data, tmp_path / "run", tiny_settings(tiny_base, device=device),
              report=lambda m: None, progress=False)


def test_prompt_loss_teaches_the_instructions_as_well(tmp_path, tiny_base, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from instructlm.data.encode import IGNORE_INDEX, EncodedExample, encode_examples
    from instructlm.data.formats import read_instruction_file
    from instructlm.data.templates import parse_template
    from instructlm.model.loss import mean_loss

    data = tmp_path / "f.txt"
    data.write_text(TINY_FILE, encoding="utf-8")
    examples = read_instruction_file(data).train
    template = parse_template("seed-en")
    both, _ = encode_examples(examples, template, tiny_tokenizer, 512, prompt_loss=True)
    response, _ = encode_examples(examples, template, tiny_tokenizer, 512)
    # The instructions' tokens alone: what prompt loss adds to the responses' labels.
    instructions = [EncodedExample(b.input_ids,
                                   b.labels[:-r.n_labels] + [IGNORE_INDEX] * r.n_labels)
                    for b, r in zip(both, response, strict=True)]
    loss = {}
    for on in (False, True):
        run = train(data, tmp_path / f"run-{on}",
                    tiny_settings(tiny_base, epochs=20, prompt_loss=on),
                    report=lambda m: None, progress=False)
        assert json.loads((run / RUN_FILE).read_text())["settings"]["prompt_loss"] is on
        model = AutoModelForCausalLM.from_pretrained(run)
        loss[on] = mean_loss(model, instructions, 4, tiny_tokenizer.pad_token_id, "cpu")
    assert loss[True] < loss[False] / 2


def test_without_template_a_run_is_taught_in_seed_en_and_lora_or_conversations_in_chat(
        tmp_path, tiny_base):
    plain = tmp_path / "facts.txt"
    plain.write_text(TINY_FILE, encoding="utf-8")
    talk = tmp_path / "talk.jsonl"
    talk.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Say hello."},
                                             {"role": "assistant", "content": "Hello!"}]})
                    + "\n", encoding="utf-8")
    for data, lora, expected in ((plain, False, "seed-en"), (plain, True, "chat"),
                                 (talk, False, "chat")):
        said: list[str] = []
        run = train(data, tmp_path / f"{data.stem}-{lora}",
                    tiny_settings(tiny_base, template="auto", epochs=1, lora=lora),
                    report=said.append, progress=False)
        assert json.loads((run / RUN_FILE).read_text())["template"]["name"] == expected
        assert f"template {expected}" in "\n".join(said)
        assert not any("earlier chat turns" in line for line in said)


def test_closing_answers_mark_what_went_wrong():
    row = dict(instruction="Name two trees.", expected="Oak, elm", stopped=True)
    lines = format_answers([{**row, "answer": "Apple, pear", "format": True, "copied": True},
                            {**row, "answer": "Ash, fir", "format": True, "copied": False},
                            {**row, "answer": "Trees", "format": False, "copied": None}])
    answers = [line for line in lines.splitlines() if "answer:" in line]
    assert answers[0].endswith("Apple, pear  [a taught answer]")
    assert answers[1].endswith("Ash, fir")
    assert answers[2].endswith("Trees  [other format]")
