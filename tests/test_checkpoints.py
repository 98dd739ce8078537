"""--save-every and --resume: an interrupted run, resumed, ends exactly where an
uninterrupted one does (weights, losses, answers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import EIGHT_FACTS, tiny_settings
from safetensors.torch import load_file

from instructlm.cli import main
from instructlm.errors import InstructlmError
from instructlm.training import checkpoints
from instructlm.training.optimize import TrainStep
from instructlm.training.train import resume, train

QUIET = dict(report=lambda m: None, progress=False)


def weights(run: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (run / "adapter_config.json").exists() \
        else "model.safetensors"
    return load_file(run / name)


def losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


def interrupt_at(monkeypatch, step_number: int) -> None:
    """Make training stop with Ctrl-C as step `step_number` begins."""
    real, calls = TrainStep.__call__, []

    def call(self, batch, share=1.0):
        calls.append(1)
        if len(calls) == step_number:
            raise KeyboardInterrupt
        return real(self, batch, share)

    monkeypatch.setattr(TrainStep, "__call__", call)


# 8 examples in batches of 3: 3 steps an epoch, 12 in all; checkpoints every 4 steps.
DATA = EIGHT_FACTS


@pytest.fixture
def deterministic():
    """Deterministic kernels: on a GPU some (the embedding's backward) add in a varying order,
    and two runs, interrupted or not, then differ in the last bits. No change on a CPU."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


# Checkpoints every 4 steps, stopped as step 7 begins: the checkpoint of step 4, inside the
# second epoch. Every 3 steps, stopped at step 5: that of step 3, the end of the first epoch,
# saved before its eval loss, which the resumed run must still compute.
@pytest.mark.parametrize("lora,every,stop", [(False, 4, 7), (True, 4, 7), (False, 3, 5)],
                         ids=["full", "lora", "full-at-an-epoch-end"])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_base, write, monkeypatch,
                                                    lora, every, stop, deterministic):
    data = write("facts.txt", DATA)
    settings = tiny_settings(tiny_base, epochs=4, save_every=every, lora=lora,
                             lr=1e-2 if lora else 3e-3)
    whole = train(data, tmp_path / "whole", settings, **QUIET)

    interrupt_at(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "cut", settings, **QUIET)
    assert not (tmp_path / "cut").exists()
    folder = checkpoints.checkpoint_dir(tmp_path / "cut")
    assert checkpoints.read_about(folder)["done"] == every
    monkeypatch.undo()

    resumed = resume(tmp_path / "cut", **QUIET)
    assert not folder.exists()  # removed once the run is saved
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(whole) == losses(resumed)


def test_a_checkpoint_is_not_overwritten_by_a_fresh_start(tmp_path, tiny_base, write,
                                                          monkeypatch, capsys):
    data = write("facts.txt", DATA)
    interrupt_at(monkeypatch, 3)
    code = main(["train", str(data), "--output", str(tmp_path / "run"), "--base",
                 str(tiny_base), "--template", "seed-en", "--save-every", "2", "--quiet"])
    assert code == 130
    assert f"instructlm train --resume {tmp_path / 'run'}" in capsys.readouterr().out
    monkeypatch.undo()
    with pytest.raises(InstructlmError, match="checkpoint of an interrupted run"):
        train(data, tmp_path / "run", tiny_settings(tiny_base), **QUIET)
    assert main(["train", "--resume", str(tmp_path / "run"), str(data)]) == 2
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "instructlm.json").exists()


def test_resume_refuses_a_changed_file_and_a_missing_checkpoint(tmp_path, tiny_base, write,
                                                                monkeypatch):
    data = write("facts.txt", DATA)
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "run", tiny_settings(tiny_base, save_every=2), **QUIET)
    monkeypatch.undo()
    data.write_text(DATA + "Say yes.#Yes!\n", encoding="utf-8")
    with pytest.raises(InstructlmError, match="has changed"):
        resume(tmp_path / "run", **QUIET)
    with pytest.raises(InstructlmError, match="no checkpoint to resume"):
        resume(tmp_path / "other", **QUIET)
